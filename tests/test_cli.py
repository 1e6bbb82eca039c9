"""The command line: inspect, compile, run and demo do what the README says."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

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
    from crowdgraph import InputError

    with pytest.raises(InputError, match="NAME=DxDxD"):
        parse_shapes(["input_ids=eight"])


# -- what a newcomer types -------------------------------------------------

TINY = ["--size", "tiny", "--shape", "input_ids=1x16", "--shape", "attention_mask=1x16"]


def exit_code(argv, *, run=main):
    """``run(argv)``'s exit code, whether it returns it or argparse exits with it."""
    try:
        return run(argv)
    except SystemExit as exc:
        return exc.code


def one_line_error(argv, capsys, *, run=main, prefix="crowdgraph: error: "):
    """Run the command, check it failed with exit 2 and one line on stderr; return that line."""
    code = exit_code(argv, run=run)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(prefix) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_version(capsys):
    import crowdgraph

    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"crowdgraph {crowdgraph.__version__}"


def test_help_has_no_markup(capsys):
    for argv in (["--help"], ["run", "--help"], ["serve", "--help"]):
        assert exit_code(argv) == 0
        assert "``" not in capsys.readouterr().out


def test_run_batch_sets_the_rows_of_every_input_and_says_when_it_cuts_again(tmp_path, capsys):
    assert main(["run", *TINY, "--budget", "14MB", "--batch", "8", "--microbatch", "4", "--workers", "2",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "output logits: shape [8, 2]" in out
    assert "re-partitioned: the micro-batches (input_ids=4x16, attention_mask=4x16) are larger" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["microbatches"] == 2
    # the table printed is the plan that ran, at the micro-batch shape
    assert f"{report['partitions']} partitions; budget 14.0 MB; shapes input_ids=[4, 16]" in out


def test_run_at_the_compiled_shape_does_not_cut_again(capsys):
    assert main(["run", *TINY, "--budget", "14MB", "--batch", "2", "--microbatch", "1", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "re-partitioned" not in out and "shapes input_ids=[1, 16]" in out


def test_run_says_when_workers_have_nothing_to_do(capsys):
    assert main(["run", *TINY, "--partitions", "2", "--workers", "4", "--microbatch", "4"]) == 0
    out = capsys.readouterr().out
    assert "note: 1 micro-batch of 2 partitions are fewer tasks at a time than 4 workers" in out and "--batch 16" in out


def test_run_inputs_from_npz_match_the_whole_model(tmp_path, capsys):
    from crowdgraph import zoo
    from tests.oracle import assert_matches, oracle

    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=4, sequence=16)
    np.savez(tmp_path / "in.npz", **feeds)
    assert main(["run", *TINY, "--budget", "14MB", "--inputs", str(tmp_path / "in.npz"), "--microbatch", "2",
                 "--workers", "2", "--output", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as got:
        assert_matches(dict(got), oracle(model, feeds))


def test_run_a_plan_folder_that_compile_wrote(tmp_path, capsys):
    plan = str(tmp_path / "plan")
    assert main(["compile", *TINY, "--partitions", "3", "-o", plan]) == 0
    assert f"crowdgraph run {plan}" in capsys.readouterr().out
    assert main(["run", plan, "--batch", "4", "--microbatch", "1", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 partitions; budget none" in out and "output logits: shape [4, 2]" in out
    assert main(["inspect", plan]) == 0
    assert "3 partitions" in capsys.readouterr().out
    err = one_line_error(["run", plan, "--budget", "48MB"], capsys)
    assert "is a plan folder, which runs as it was compiled; drop --budget" in err


def test_demo_without_matplotlib_prints_the_report_and_a_hint(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from crowdgraph.cli import main\n"
            "sys.exit(main(['demo', '--size', 'tiny', '--budget', '16MB', '--batch', '2', '--sequence', '16',"
            " '--microbatch', '1', '--workers', '2']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.rstrip().splitlines()
    assert "max abs difference to one whole-model session" in lines[-2]
    assert lines[-1] == "no timeline picture: matplotlib is not installed (pip install 'crowdgraph[plot]')"
    assert not (tmp_path / "timeline.png").exists()


# -- every bad input is one line and exit code 2 --------------------------

@pytest.mark.parametrize("budget", ["abc", "5XB", "1e3MB", "", "inf", "nan", "9" * 400, "-5MB"])
def test_bad_budget(budget, capsys):
    err = one_line_error(["inspect", "--size", "tiny", "--budget", budget], capsys)
    assert "argument --budget" in err


@pytest.mark.parametrize("count", ["-1", "0", "two"])
def test_bad_partition_count(count, capsys):
    assert "argument --partitions" in one_line_error(["inspect", "--size", "tiny", "--partitions", count], capsys)


@pytest.mark.parametrize("shape", ["input_ids=-1x16", "input_ids=0x16", "input_ids=eight", "=1x16"])
def test_bad_shape(shape, capsys):
    assert "NAME=DxDxD" in one_line_error(["inspect", "--size", "tiny", "--shape", shape], capsys)


def test_compile_onto_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    err = one_line_error(["compile", "--size", "tiny", "--partitions", "2", "-o", str(tmp_path / "taken")], capsys)
    assert "is a file" in err


def test_compile_where_nothing_can_be_written(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    err = one_line_error(["compile", "--size", "tiny", "--partitions", "2", "-o", str(tmp_path / "taken" / "plan")],
                         capsys)
    assert "cannot write a plan folder at" in err


def test_run_inputs_not_a_zip(tmp_path, capsys):
    (tmp_path / "in.npz").write_bytes(b"not a zip at all")
    assert "cannot read --inputs" in one_line_error(["run", *TINY, "--inputs", str(tmp_path / "in.npz")], capsys)


def test_run_inputs_missing(tmp_path, capsys):
    err = one_line_error(["run", *TINY, "--inputs", str(tmp_path / "missing.npz")], capsys)
    assert "cannot read --inputs" in err and "numpy.savez" in err


def test_run_inputs_one_bare_array(tmp_path, capsys):
    np.save(tmp_path / "in.npy", np.ones((1, 16), dtype=np.int64))
    assert "holds one array" in one_line_error(["run", *TINY, "--inputs", str(tmp_path / "in.npy")], capsys)


@pytest.mark.parametrize("argv", [["--memory", "abc"], ["--cache-size", "xyz"], ["--threads", "0"]])
def test_worker_bad_sizes(argv, capsys):
    from crowdgraph_tcp.worker import main as worker_main

    one_line_error(["tcp://127.0.0.1:1", "--token", "t", *argv], capsys, run=worker_main,
                   prefix="crowdgraph-worker: error: argument")


def test_serve_heartbeat_zero(capsys):
    assert "argument --heartbeat" in one_line_error(["serve", "--heartbeat", "0"], capsys)


def test_serve_certfile_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CROWDGRAPH_TOKEN", "a-token")
    missing = str(tmp_path / "cert.pem")
    assert f"--certfile {missing}: no such file" in one_line_error(["serve", "--certfile", missing], capsys)


# -- interrupted and killed writers -------------------------------------

_KILL_DURING_WRITE = """
import os, signal, sys
import crowdgraph.compiled as compiled
from crowdgraph.cli import main
# As in a terminal: a shell that starts a job in the background makes it ignore SIGINT.
signal.signal(signal.SIGINT, signal.default_int_handler)
written = compiled.write_partition
def write_then_signal(part, folder):
    path = written(part, folder)
    os.kill(os.getpid(), signal.{signal})
    return path
compiled.write_partition = write_then_signal
sys.exit(main(["compile", "--size", "tiny", "--partitions", "3", "-o", sys.argv[1]]))
"""


def _compile_and_signal(signal_name: str, plan) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _KILL_DURING_WRITE.format(signal=signal_name), str(plan)],
                          capture_output=True, text=True, timeout=120)


def test_ctrl_c_during_compile_is_one_line_and_leaves_nothing(tmp_path):
    done = _compile_and_signal("SIGINT", tmp_path / "plan")
    assert done.returncode == 130
    assert done.stderr == "crowdgraph: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_next_compile_removes_what_a_killed_one_left(tmp_path):
    done = _compile_and_signal("SIGKILL", tmp_path / "plan")
    assert done.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".plan.")  # the staging folder of the killed writer
    assert main(["compile", "--size", "tiny", "--partitions", "2", "-o", str(tmp_path / "plan")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]


def test_live_view_ends_with_what_the_report_says(capsys):
    assert main(["run", *TINY, "--partitions", "3", "--batch", "6", "--microbatch", "2", "--workers", "2",
                 "--live"]) == 0
    captured = capsys.readouterr()
    live = captured.err.strip().splitlines()
    assert live[0].startswith("9/9 tasks [####################] 100%")
    table = [line.split() for line in captured.out.splitlines() if line.startswith("thread-")]
    assert len(live) == 1 + len(table) == 3
    for row in table:  # worker, budget (2 cells), tasks, loads, unloads, tiers 1/2/3/4, ...
        view = next(line.split() for line in live[1:] if line.split()[0] == row[0])
        assert view[2] == row[3] and view[6] == row[6]  # tasks and tiers agree


def test_one_batch_shape_sets_the_rows_of_every_batched_input(capsys):
    assert main(["run", *TINY, "--partitions", "2", "--batch-shape", "input_ids=3x16", "--workers", "2"]) == 0
    assert "output logits: shape [3, 2]" in capsys.readouterr().out
