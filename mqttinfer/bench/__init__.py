"""Benchmarks on the real runtime (``mqttinfer bench …``, typer object ``bench.cli.bench_app``).

``latency`` (floor vs mqttinfer vs teacher, bytes, throughput), ``failures`` (accuracy vs
failed devices through the aggregation state machine), ``aggregator`` (the pure state
machine's partials/s and memory), ``heterogeneity`` (planner predictions vs an emulated
fleet). docs/benchmarks.md describes each and records the numbers measured.
"""
