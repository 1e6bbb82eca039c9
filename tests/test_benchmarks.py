"""``python -m benchmarks --quick`` runs and writes well-formed JSON (no timing assertions)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

#: One ``--quick`` run is every benchmark end to end (Dask cluster, worker processes, full-size
#: plans): a slow test.  The modules it measures have fast tests of their own.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parent.parent
NAMES = ("scale", "crowd", "transport", "streaming", "overhead", "memory", "estimate", "generate", "audit")
KEYS = {"benchmark", "quick", "machine", "config", "rows", "targets", "seconds", "skipped"}
MACHINE_KEYS = {"cpu", "cores", "memory_bytes", "python", "onnxruntime"}
TARGET_KEYS = {"benchmark", "name", "value", "limit", "op", "passed", "verdict", "line"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    return done, out


def test_quick_run_succeeds(quick_run):
    done, _ = quick_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "=== summary" in done.stdout
    assert "PASS" in done.stdout or "MISS" in done.stdout


@pytest.mark.parametrize("name", NAMES)
def test_result_json(quick_run, name):
    _, out = quick_run
    data = json.loads((out / f"{name}.json").read_text())
    assert KEYS <= set(data), sorted(KEYS - set(data))
    assert data["benchmark"] == name and data["quick"] is True
    assert MACHINE_KEYS <= set(data["machine"])
    assert "error" not in data
    for target in data["targets"]:
        assert TARGET_KEYS <= set(target)
        assert target["verdict"] in ("PASS", "MISS", "n/a")
    if data["skipped"] is None:
        assert data["rows"] or data.get("simulated"), f"{name} measured nothing"


def test_expected_rows(quick_run):
    _, out = quick_run
    load = lambda name: json.loads((out / f"{name}.json").read_text())  # noqa: E731
    transport = load("transport")
    assert {r["codec"] for r in transport["totals"]} >= {"lz4", "lz4 + shuffle", "zlib", "zlib + shuffle"}
    assert all(r["bytes"] > 0 and r["crowdio_bytes"] > 0 for r in transport["rows"])
    overhead = load("overhead")
    for r in overhead["rows"]:
        assert {"median", "min", "max"} <= set(r["ratio"])
    if overhead["config"]["tcp"]:
        assert overhead["prefetch"]["stored_last_run"] > 0 and overhead["prefetch"]["ratio"]["median"] > 0
    streaming = load("streaming")
    assert {r["crowd"] for r in streaming["simulated"] if r["compiles"]} == {"heterogeneous", "equal"}
    scale = load("scale")
    assert {r["what"] for r in scale["rows"]} == {"scheduler", "simulate()", "dask"}
    crowd = load("crowd")
    assert {"pipeline", "greedy", "cost"} <= set(crowd["rows"][0])
    assert all(r["cost"]["makespan"] > 0 and r["cost"]["speedup"] > 0 for r in crowd["rows"])
    memory = load("memory")
    if memory["skipped"] is None:
        ran = [r for r in memory["rows"] if r.get("workers")]
        assert ran and all(w["peak_rss"] for r in ran for w in r["workers"])
    summary = load("summary")
    assert set(summary["benchmarks"]) == set(NAMES)
