#!/usr/bin/env bash
# Benchmarks the fraud stage against a plain Kafka copy on a local nisshi broker:
#   bash scripts/bench.sh                          # 20,000 orders
#   ORDERFLOW_BENCH_ORDERS=50000 bash scripts/bench.sh
# Extra arguments go to `cargo bench`. The broker is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/test.sh
source scripts/test.sh
ensure_tools
start_broker

section "cargo bench --bench fraud_throughput"
cargo bench --bench fraud_throughput "$@" || die "benchmark failed (worker logs in target/test-logs/, broker log $BROKER_LOG)"
