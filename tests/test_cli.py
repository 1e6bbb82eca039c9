"""The command line: inspect, compile, run and demo do what the README says."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from crowdgraph.cli import main, parse_shapes


def test_run_prints_the_report_and_writes_files(tmp_path, capsys):
    code = main(["run", "--size", "tiny", "--partitions", "3", "--workers", "2", "--shape", "input_ids=4x16",
                 "--microbatch", "2", "--timeline", str(tmp_path / "t.png"), "--json", str(tmp_path / "r.json"),
                 "--output", str(tmp_path / "out.npz")])
    assert code == 0
    out = capsys.readouterr().out
    assert "tiers 1/2/3/4" in out and "output logits: shape [4, 2]" in out
    assert json.loads((tmp_path / "r.json").read_text())["microbatches"] == 2
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    with np.load(tmp_path / "out.npz") as data:
        assert data["logits"].shape == (4, 2)


def test_demo_checks_itself_against_the_oracle(tmp_path, capsys):
    code = main(["demo", "--size", "tiny", "--budget", "16MB", "--batch", "4", "--sequence", "16",
                 "--microbatch", "2", "--timeline", str(tmp_path / "timeline.png")])
    assert code == 0
    out = capsys.readouterr().out
    assert "max abs difference to one whole-model session" in out
    assert (tmp_path / "timeline.png").exists()


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["inspect", "--size", "tiny", "--budget", "1MB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crowdgraph: error: node ") and "smallest budget" in err


def test_python_dash_m_crowdgraph(tmp_path):
    done = subprocess.run([sys.executable, "-m", "crowdgraph", "compile", "--size", "tiny", "--partitions", "2",
                           "-o", str(tmp_path / "plan")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "plan" / "plan.json").exists()


def test_parse_shapes_rejects_nonsense():
    import pytest

    from crowdgraph import InputError

    with pytest.raises(InputError, match="NAME=DxDxD"):
        parse_shapes(["input_ids=eight"])
