#!/bin/sh
# Every benchmark of docs/benchmarks.md, in the order the document gives them (about 10 min on
# 2 cores). Needs: the shipped demo bundle, bench-results/timing-bundle
# (benchmarks/make_timing_bundle.py) and bench-results/failure-bundles
# (benchmarks/train_failure_bundles.py). Then: .venv/bin/python benchmarks/summarize.py
set -eu
cd "$(dirname "$0")/.."
MQ=".venv/bin/python -m mqttinfer"
OUT=${OUT:-bench-results}
uptime
# Latency: the shipped demo bundle, then the timing bundle; two more runs of each for the spread.
$MQ bench latency --out "$OUT/demo"
$MQ bench latency --bundle bench-results/timing-bundle --out "$OUT/timing"
for run in 2 3; do
    $MQ bench latency --no-plots --out "$OUT/repeats/demo-$run"
    $MQ bench latency --no-plots --bundle bench-results/timing-bundle --out "$OUT/repeats/timing-$run"
done
# What the device's fast path saves (EXPERIMENT: benchmarks/handoff_experiment turns it off).
for run in 1 2 3; do
    $MQ bench latency --no-plots --out "$OUT/handoff/fast-$run"
    MQTTINFER_FAST_PATH=off PYTHONPATH=benchmarks/handoff_experiment \
        $MQ bench latency --no-plots --out "$OUT/handoff/queue-$run"
done
$MQ bench aggregator --out "$OUT"
$MQ bench failures --out "$OUT"
$MQ bench failures --bundles /nonexistent --out "$OUT/demo-failures"
$MQ bench heterogeneity --out "$OUT"
uptime
