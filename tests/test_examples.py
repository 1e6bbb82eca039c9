"""Every example runs and says what it should; the example executor passes the conformance suite."""

from __future__ import annotations

import importlib
import pathlib
import re
import subprocess
import sys

import pytest

from crowdgraph.testing import ExecutorConformance

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, cwd: pathlib.Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_compile_and_inspect(tmp_path):
    out = run_example("compile_and_inspect.py", str(tmp_path), cwd=tmp_path)
    assert "est. resident MB" in out and "->" in out
    assert (tmp_path / "plan" / "plan.json").exists()


def test_run_threads(tmp_path):
    out = run_example("run_threads.py", cwd=tmp_path)
    diff = float(out.split("max abs difference to the whole model: ")[1].split()[0])
    assert diff <= 1e-4
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_live_report(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "live_report.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split("max abs difference to the whole model: ")[1].split()[0]) <= 1e-4
    assert done.stderr.splitlines()[0].startswith("32/32 tasks")  # the live view's final state
    assert (tmp_path / "report.html").read_text().count('class="worker-row"') == 4


@pytest.mark.slow  # simulates 1000 phones on full DistilBERT; tests/test_simulate.py checks the same, fast
def test_simulate_crowd(tmp_path):
    out = run_example("simulate_crowd.py", cwd=tmp_path)
    times = {line.split(":")[0].strip(): float(line.split(" in ")[1].split()[0])
             for line in out.splitlines() if line.startswith(("barrier", "streaming"))}
    assert times["streaming"] < times["barrier"]
    assert "1000 phones" in out


def test_process_executor_example(tmp_path):
    out = run_example("process_executor.py", cwd=tmp_path)
    assert float(out.split("max abs difference to the whole model: ")[1].split()[0]) <= 1e-4
    rows = [[c.strip() for c in line.split("  ") if c.strip()] for line in out.splitlines()
            if line.startswith("proc-")]
    bytes_in = [row[7] for row in rows if row[2] != "0"]  # of the workers that ran tasks
    assert bytes_in and "0 B" not in bytes_in, out
    assert "partition bytes sent 0 B" not in out


def test_audit_liar(tmp_path):
    out = run_example("audit_liar.py", cwd=tmp_path)
    diffs = {line.split(":")[0]: float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
             if "max abs difference to the whole model" in line}
    assert int(re.search(r"the liar ran (\d+) tasks", out)[1]) > 0
    assert diffs["audit off"] > 1e-3  # the liar's numbers reach the logits (up to 0.06) unnoticed
    assert diffs["audit on"] <= 1e-4 and diffs["private"] <= 1e-4
    assert "quarantined: liar" in out and "ran at home" in out


def _load_example(name: str):
    # Spawned worker processes import the example by name; they inherit sys.path.
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


class TestProcessExecutorConformance(ExecutorConformance):
    can_lose_workers = True

    def make_executor(self, budgets):
        return _load_example("process_executor").ProcessExecutor(budgets)

    def kill_worker(self, executor, worker_id):
        executor.kill(worker_id)

    def assert_stopped(self, executor):
        assert not executor._workers


def test_generate(tmp_path):
    out = run_example("generate.py", cwd=tmp_path)
    assert "tokens equal to the whole model: True" in out
    assert "3 sequences, 9 prompt tokens, 36 new tokens in 12 steps" in out
    kept = int(out.split("caches kept on the workers: ")[1].split()[0])
    assert kept >= 3 * 2, "every sequence's cache stays on the workers of the layers with a cache"
    assert len(out.split("sampled, step by step:")[1].splitlines()[0].split()) == 8


def test_chunk_long_sequence(tmp_path):
    out = run_example("chunk_long_sequence.py", "tiny", "128", "4", "3MB", cwd=tmp_path)
    assert "regions tiled to fit the budget" in out and "chunks by sequence" in out
    assert float(out.split("max abs difference to the whole model: ")[1].split()[0]) <= 1e-4


def test_tile_image_model(tmp_path):
    out = run_example("tile_image_model.py", cwd=tmp_path)
    assert "regions tiled to fit the budget" in out and "tiles by rows" in out
    assert float(out.split("max abs difference to the whole model: ")[1].split()[0]) <= 1e-4
