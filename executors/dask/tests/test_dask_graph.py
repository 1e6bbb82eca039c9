"""crowdgraph.dask_graph.to_dask: the task graph as a plain Dask graph, run by Dask's schedulers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import crowdgraph
from crowdgraph import dask_graph, zoo
from crowdgraph.dask_graph import output_keys, to_dask
from crowdgraph.errors import InputError
from tests.models import diamond, multi_io
from tests.oracle import assert_matches, oracle

dask = pytest.importorskip("dask")
import dask.threaded  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, dict[str, np.ndarray], Any, dict[str, np.ndarray]]:
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=8, sequence=16)
    return model, feeds, crowdgraph.compile(model, partitions=4, sample=feeds), oracle(model, feeds)


@pytest.mark.parametrize("get", [dask.threaded.get, dask.get], ids=["threaded", "sync"])
@pytest.mark.parametrize("mode", ["streaming", "barrier"])
def test_distilbert_graph_matches_the_oracle(tiny, get, mode) -> None:
    _, feeds, compiled, want = tiny
    dsk = to_dask(compiled, feeds, microbatch=3, mode=mode)  # 3 + 3 + 2 rows
    [got] = get(dsk, output_keys(dsk))
    assert_matches(got, want)


@pytest.mark.parametrize("case", [diamond, multi_io])
def test_branching_graphs_with_several_outputs_match_the_oracle(case) -> None:
    model, feeds = case(batch=5)
    compiled = crowdgraph.compile(model, partitions=3, sample=feeds)
    dsk = to_dask(compiled, feeds, microbatch=2)
    [got] = dask.threaded.get(dsk, output_keys(dsk))
    assert_matches(got, oracle(model, feeds))
    assert list(got) == compiled.output_names


def test_distributed_client_runs_the_graph(client, tiny) -> None:
    _, feeds, compiled, want = tiny
    dsk = to_dask(compiled, feeds, microbatch=2, mode="barrier")
    [got] = client.get(dsk, output_keys(dsk))
    assert_matches(got, want)


def test_keys_are_dask_style_and_barriers_wait_for_every_micro_batch(tiny) -> None:
    _, feeds, compiled, _ = tiny
    names = [p.name for p in compiled.partitions]
    streaming = to_dask(compiled, feeds, microbatch=4)
    assert {(p, i) for p in names for i in range(2)} <= set(streaming)
    assert streaming[(names[1], 0)][1:] == (("crowdgraph-model", names[1]), (names[0], 0))
    barrier = to_dask(compiled, feeds, microbatch=4, mode="barrier")
    assert ("crowdgraph-barrier", names[0]) in barrier[(names[1], 0)]
    done = barrier[("crowdgraph-barrier", names[0])][1:]
    assert done == (("crowdgraph-done", names[0], 0), ("crowdgraph-done", names[0], 1))
    assert barrier[("crowdgraph-done", names[0], 1)][1:] == ((names[0], 1),)


def test_sessions_are_opened_once_per_process(tiny, monkeypatch) -> None:
    _, feeds, compiled, want = tiny
    dask_graph.clear_sessions()
    opened: list[int] = []
    real = dask_graph.open_session
    monkeypatch.setattr(dask_graph, "open_session", lambda data: opened.append(len(data)) or real(data))
    dsk = to_dask(compiled, feeds, microbatch=1)
    [got] = dask.threaded.get(dsk, output_keys(dsk), num_workers=2)
    assert_matches(got, want)
    assert len(opened) == len(compiled.partitions)
    assert dask_graph.cached_sessions() == sorted(p.sha256 for p in compiled.partitions)
    assert dask_graph.clear_sessions() == len(compiled.partitions) and not dask_graph.cached_sessions()


def test_inputs_and_modes_are_checked(tiny) -> None:
    _, feeds, compiled, _ = tiny
    with pytest.raises(InputError, match="mode"):
        to_dask(compiled, feeds, mode="eager")
    with pytest.raises(InputError, match="missing"):
        to_dask(compiled, {"input_ids": feeds["input_ids"]})
    with pytest.raises(InputError, match="to_dask"):
        output_keys({"x": 1})


def test_the_module_works_without_dask_installed() -> None:
    code = textwrap.dedent("""
        import sys
        for name in ("dask", "distributed", "toolz", "cloudpickle"):
            sys.modules[name] = None  # any import of these now fails
        import crowdgraph
        from crowdgraph import zoo
        from crowdgraph.dask_graph import to_dask, output_keys, _get_sync
        model = zoo.distilbert("tiny")
        feeds = zoo.sample_inputs(model, batch=4, sequence=8)
        compiled = crowdgraph.compile(model, partitions=2, sample=feeds)
        dsk = to_dask(compiled, feeds, microbatch=2, mode="barrier")
        out = _get_sync(dsk, output_keys(dsk)[0])
        assert out["logits"].shape == (4, 2)
        assert not any(m == "dask" or m.startswith("dask.") for m in sys.modules if sys.modules[m] is not None)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
