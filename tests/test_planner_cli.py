"""``mqttinfer plan …`` through typer: outputs, JSON, and one-line errors without tracebacks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mqttinfer.planner.cli import app
from mqttinfer.planner.plan import load_plan

REPO = Path(__file__).resolve().parents[1]
FLEET = str(REPO / "devices" / "example-fleet.yaml")
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def make(tmp_path: Path, *extra: str):
    out = tmp_path / "site.yaml"
    result = invoke(
        "make",
        "--devices",
        FLEET,
        "--channels",
        "64",
        "--input-shape",
        "1,28,28",
        "--out",
        str(out),
        *extra,
    )
    return result, out


def assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")
    for needle in needles:
        assert needle in result.output


def test_make_show_simulate(tmp_path):
    result, out = make(tmp_path, "--strategy", "rocoin", "--epsilon", "0.05")
    assert result.exit_code == 0, result.output
    assert "3 groups over 6 devices" in result.output
    plan = load_plan(out)
    assert plan.name == "site" and plan.strategy == "rocoin"
    shown = invoke("show", str(out))
    assert shown.exit_code == 0 and "g0" in shown.output and "ε met: yes" in shown.output
    simulated = invoke("simulate", str(out), "--trials", "2000", "--seed", "3")
    assert simulated.exit_code == 0 and "completed" in simulated.output


def test_json_outputs(tmp_path):
    result, out = make(tmp_path, "--strategy", "hetnonn", "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["strategy"] == "hetnonn"
    shown = json.loads(invoke("show", str(out), "--json").output)
    assert len(shown["groups"]) == 6
    simulated = json.loads(invoke("simulate", str(out), "--trials", "100", "--json").output)
    assert simulated["trials"] == 100 and 0 <= simulated["completion_rate"] <= 1


def test_make_from_activations(tmp_path):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).random((100, 30)).astype(np.float32))
    result, out = make(tmp_path, "--activations", str(acts), "--channels", "30")
    assert result.exit_code == 0, result.output
    assert load_plan(out).partitioning == "normalized-cut"


def test_make_with_candidates_file(tmp_path):
    result, out = make(tmp_path, "--candidates", str(REPO / "devices" / "demo-candidates.yaml"))
    assert result.exit_code == 0
    assert {g.student.arch for g in load_plan(out).groups} == {"wrn-10-0.5"}


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--strategy", "best"), ("--strategy", "fix: use one of")),
        (("--epsilon", "0.000001"), ("constraint (1f)", "pi4-a")),
        (("--epsilon", "2"), ("ε",)),
        (("--input-shape", "28,28"), ("--input-shape", "fix:")),
        (("--candidates", "nope.yaml"), ("nope.yaml", "fix:")),
        (("--activations", "missing.npy"), ("missing.npy", "file not found")),
        (("--bundle", "no-such-bundle"), ("bundle.json",)),
        (("--name", "bad/name"), ("--name",)),
        (("--min-replicas", "0"), ("--min-replicas",)),
    ],
)
def test_make_errors_are_one_line(tmp_path, args, needles):
    result, _ = make(tmp_path, *args)
    assert_clean_error(result, *needles)


def test_bad_inventory_and_plan_files(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("devices:\n  - {id: a, flops: 1G, memroy: 1M, rate: 1M, outage: 0.1}\n")
    result = invoke(
        "make", "--devices", str(fleet), "--channels", "8", "--out", str(tmp_path / "p.yaml")
    )
    assert_clean_error(result, str(fleet), "memroy", "did you mean 'memory'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\n")
    assert_clean_error(invoke("show", str(bad)), str(bad), "fix:")
    assert_clean_error(invoke("simulate", str(tmp_path / "none.yaml")), "plan file not found")
    _, out = make(tmp_path)
    assert_clean_error(invoke("simulate", str(out), "--trials", "0"), "--trials")


def test_experiment_writes_csv_and_png(tmp_path):
    result = invoke("experiment", "fig7", "--out", str(tmp_path), "--draws", "2")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "fig7.csv").open()))
    assert {row["strategy"] for row in rows} == {"rocoin", "rocoin-g", "nonn", "hetnonn"}
    assert len(rows) == 24
    assert (tmp_path / "fig7.png").read_bytes().startswith(b"\x89PNG")
    assert_clean_error(invoke("experiment", "fig9", "--out", str(tmp_path)), "fig7 or fig3")


def test_missing_matplotlib_is_a_dependency_error(monkeypatch):
    import builtins

    from mqttinfer.errors import DependencyError
    from mqttinfer.planner import experiments

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(DependencyError, match=r"pip install 'mqttinfer\[plots\]'"):
        experiments.plot_fig7([], "unused.png")


def test_show_prints_notes_verbatim():
    shown = invoke("show", str(REPO / "plans" / "heterogeneous-20.yaml"))
    assert shown.exit_code == 0
    assert "note: merged [node-" in shown.output  # brackets are not eaten as rich markup
