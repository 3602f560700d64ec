#!/bin/sh
# Every benchmark of docs/benchmarks.md, in the order the document gives them (about 12 min on
# 2 cores). Needs: the shipped demo bundle, bench-results/timing-bundle
# (benchmarks/make_timing_bundle.py) and, for the three-strategy failure plot,
# bench-results/failure-bundles (benchmarks/train_failure_bundles.py; without them `bench
# failures` falls back to the demo bundle). Then: .venv/bin/python benchmarks/summarize.py
#
#   benchmarks/run_all.sh                      # everything
#   benchmarks/run_all.sh latency aggregator   # only these parts
set -eu
cd "$(dirname "$0")/.."
MQ=".venv/bin/python -m mqttinfer"
OUT=${OUT:-bench-results}
PARTS=${*:-latency aggregator failures heterogeneity}
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
uptime
if want latency; then
    # The shipped demo bundle, then the timing bundle; two more runs of each for the spread.
    $MQ bench latency --out "$OUT/demo"
    $MQ bench latency --bundle bench-results/timing-bundle --out "$OUT/timing"
    for run in 2 3; do
        $MQ bench latency --no-plots --out "$OUT/repeats/demo-$run"
        $MQ bench latency --no-plots --bundle bench-results/timing-bundle --out "$OUT/repeats/timing-$run"
    done
    # MQTT 3.1.1 against 5 (the default), every client of the run and the floor alike.
    for run in 1 2 3; do
        for bundle in demo timing; do
            case $bundle in demo) B="" ;; *) B="--bundle bench-results/timing-bundle" ;; esac
            $MQ bench latency --no-plots $B --mqtt-version 5 --out "$OUT/mqtt/$bundle-v5-$run"
            $MQ bench latency --no-plots $B --mqtt-version 3.1.1 --out "$OUT/mqtt/$bundle-v311-$run"
        done
    done
    # What the device's fast path saves (EXPERIMENT: benchmarks/handoff_experiment turns it off).
    for run in 1 2 3; do
        $MQ bench latency --no-plots --out "$OUT/handoff/fast-$run"
        MQTTINFER_FAST_PATH=off PYTHONPATH=benchmarks/handoff_experiment \
            $MQ bench latency --no-plots --out "$OUT/handoff/queue-$run"
    done
fi
if want aggregator; then
    $MQ bench aggregator --out "$OUT"
fi
if want failures; then
    $MQ bench failures --out "$OUT"
    $MQ bench failures --bundles /nonexistent --out "$OUT/demo-failures"
fi
if want heterogeneity; then
    $MQ bench heterogeneity --out "$OUT"
fi
uptime
