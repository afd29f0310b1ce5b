#!/usr/bin/env bash
# The test command: `bash scripts/test.sh` (CI runs the same through `.ci/run`).
#
# Installs what is missing (idempotently), starts a nisshi broker on a free loopback
# port, then runs, in order, failing on the first failure:
#   cargo fmt --all -- --check
#   cargo clippy --all-targets -- -D warnings
#   cargo test --all-targets   (integration tests and the bench smoke run use the broker)
# Extra arguments go to `cargo test`, e.g. `bash scripts/test.sh -- --nocapture`.
#
# Integration tests never skip: they panic when ORDERFLOW_TEST_BROKERS is unset, and this
# script always sets it. The broker it started is stopped on exit, however the script ends.
#
# `scripts/bench.sh` sources this file for `ensure_tools` and `start_broker` only.
set -euo pipefail

NISSHI_VERSION=0.8.1

section() { printf '\n\033[1m==== %s ====\033[0m\n' "$*"; }
die() {
    printf '\n\033[1;31mFAILED: %s\033[0m\n' "$*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# Installs whatever is missing; does nothing when everything is there.
ensure_tools() {
    section "tools"
    # rdkafka builds its bundled librdkafka with configure + make and the C/C++
    # compilers; python3 picks the broker's free port.
    local missing=()
    command -v gcc >/dev/null || missing+=(gcc)
    command -v g++ >/dev/null || missing+=(g++)
    command -v make >/dev/null || missing+=(make)
    command -v perl >/dev/null || missing+=(perl)
    command -v python3 >/dev/null || missing+=(python3)
    if [ ${#missing[@]} -gt 0 ]; then
        command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
        echo "installing ${missing[*]} with apt-get"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi

    command -v cargo >/dev/null || die "cargo is not installed (https://rustup.rs)"
    local component
    for component in fmt clippy; do
        if ! cargo "$component" --version >/dev/null 2>&1; then
            command -v rustup >/dev/null || die "cargo $component is missing and rustup is not available"
            echo "installing the ${component/fmt/rustfmt} component"
            rustup component add "${component/fmt/rustfmt}"
        fi
    done

    if ! command -v nisshi >/dev/null; then
        echo "installing nisshi $NISSHI_VERSION, the test broker (about 15 minutes the first time)"
        cargo install --locked --ignore-rust-version "nisshi@$NISSHI_VERSION"
    fi
    command -v nisshi >/dev/null || die "nisshi is not on PATH after installing it (is ~/.cargo/bin on PATH?)"
    echo "cargo:  $(cargo --version)"
    echo "nisshi: $(command -v nisshi)"
}

BROKER_PID=""

stop_broker() {
    if [ -n "$BROKER_PID" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
        kill "$BROKER_PID" 2>/dev/null || true
        local _
        for _ in $(seq 1 50); do
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
        echo "stopped the broker (pid $BROKER_PID)"
    fi
    rm -f "$RUN_DIR/broker.pid"
}

# Starts nisshi on a free loopback port, waits until it accepts connections and exports
# ORDERFLOW_TEST_BROKERS; the EXIT trap stops exactly that process.
start_broker() {
    section "broker"
    RUN_DIR="$(pwd)/.test-run"
    mkdir -p "$RUN_DIR"
    BROKER_LOG="$RUN_DIR/broker.log"
    trap stop_broker EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    local port url i
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
    url="tcp://127.0.0.1:$port"
    nisshi broker \
        --listener-url "$url" \
        --advertised-listener-url "$url" \
        --storage-engine memory://tansu/ \
        >"$BROKER_LOG" 2>&1 &
    BROKER_PID=$!
    echo "$BROKER_PID" >"$RUN_DIR/broker.pid"
    echo "nisshi pid $BROKER_PID on 127.0.0.1:$port, log $BROKER_LOG"

    for i in $(seq 1 150); do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            broker_failed "nisshi exited during start-up"
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "the broker accepts connections (after $((i * 2 / 10)).$((i * 2 % 10))s)"
            export ORDERFLOW_TEST_BROKERS="127.0.0.1:$port"
            echo "ORDERFLOW_TEST_BROKERS=$ORDERFLOW_TEST_BROKERS"
            return 0
        fi
        sleep 0.2
    done
    broker_failed "nisshi did not accept connections on 127.0.0.1:$port within 30 s"
}

broker_failed() {
    echo "---- last 40 lines of $BROKER_LOG ----" >&2
    tail -n 40 "$BROKER_LOG" >&2 || true
    die "$1"
}

# Sourced (by bench.sh): define the functions only.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    return 0
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ensure_tools
start_broker

section "cargo fmt --all -- --check"
cargo fmt --all -- --check || die "formatting differs from rustfmt's"

section "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings || die "clippy found problems"

section "cargo test --all-targets"
started=$SECONDS
cargo test --all-targets "$@" || die "tests failed (worker logs in target/test-logs/, broker log $BROKER_LOG)"
echo "tests passed in $((SECONDS - started))s"

section "all checks passed"
