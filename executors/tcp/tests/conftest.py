"""Shared helpers for the crowdgraph-tcp tests: real worker processes, sockets on 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

TCP_ROOT = Path(__file__).resolve().parents[1]
REPO = TCP_ROOT.parents[1]


def child_env() -> dict[str, str]:
    """Environment for child processes: this checkout importable, no token leaking in."""
    env = dict(os.environ)
    paths = [str(TCP_ROOT), str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.pop("CROWDGRAPH_TOKEN", None)
    return env


def run_example(name: str, timeout: float) -> str:
    """Run ``examples/<name>`` as a user would (this checkout importable); its stdout, once it exits 0."""
    done = subprocess.run([sys.executable, str(REPO / "examples" / name)], env=child_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def stop_process(proc: subprocess.Popen) -> None:
    """SIGCONT (in case it was stopped), then terminate / kill; never leaves it running."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)
        except OSError:
            pass
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_until(predicate, timeout: float = 30.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class BackgroundRun:
    """``compiled.run(feeds, executor=..., **options)`` on a thread, so a test can act meanwhile."""

    def __init__(self, compiled, feeds, executor, **options):
        self.outputs = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(compiled, feeds, executor, options))
        self.thread.start()

    def _run(self, compiled, feeds, executor, options) -> None:
        try:
            self.outputs = compiled.run(feeds, executor=executor, **options)
        except BaseException as exc:  # re-raised by result()
            self.error = exc

    def running(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout: float):
        """The run's outputs; raises what the run raised, or if it is still going after ``timeout``."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not end within {timeout} s"
        if self.error is not None:
            raise self.error
        return self.outputs


def scripted_worker(ex, script: str, name: str, cache_dir: Path, *args: str, memory: str = "64MB") -> subprocess.Popen:
    """A ``crowdgraph-worker`` run by ``script`` (``python -c script *args URL ...``: a worker with some of
    its methods replaced, to play a hostile peer) joined to ``ex``; its output is piped."""
    joined = len(ex.coordinator.workers)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args, ex.url, "--token", ex.token.decode(), "--memory", memory,
         "--name", name, "--threads", "1", "--cache-dir", str(cache_dir / name)],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(ex.coordinator.workers) == joined + 1, what=f"worker {name} to join")
    except BaseException:
        stop_process(proc)
        raise
    return proc


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def tcp_helpers():
    """child_env(), run_example(name, timeout), stop_process(proc), wait_until(pred, timeout, what),
    BackgroundRun, scripted_worker."""
    from types import SimpleNamespace

    return SimpleNamespace(child_env=child_env, run_example=run_example, stop_process=stop_process, wait_until=wait_until,
                           BackgroundRun=BackgroundRun, scripted_worker=scripted_worker)
