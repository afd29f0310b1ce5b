#!/usr/bin/env bash
# Benchmarks on a local nisshi broker:
#   bash scripts/bench.sh                          # fraud stage vs plain copy, 20,000 orders
#   ORDERFLOW_BENCH_ORDERS=50000 bash scripts/bench.sh
#   bash scripts/bench.sh memory                   # worker RSS over 1,000,000 orders
#   ORDERFLOW_BENCH_MEMORY_ORDERS=200000 bash scripts/bench.sh memory
# The first argument may name the benchmark (`fraud_throughput`, the default, or
# `memory`); further arguments go to `cargo bench`. The broker is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/test.sh
source scripts/test.sh

bench=fraud_throughput
case "${1:-}" in
    fraud_throughput | memory)
        bench=$1
        shift
        ;;
esac

ensure_tools
start_broker

section "cargo bench --bench $bench"
cargo bench --bench "$bench" "$@" || die "benchmark failed (worker logs in target/test-logs/, broker log $BROKER_LOG)"
