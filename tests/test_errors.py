"""Wrong values given to the API raise one of crowdgraph's errors, saying what to do, never a raw one."""

from __future__ import annotations

import json

import numpy as np
import pytest

import crowdgraph
from crowdgraph import zoo
from crowdgraph.errors import InputError, PlanError

SHAPES = {"input_ids": (1, 16), "attention_mask": (1, 16)}


@pytest.fixture(scope="module")
def tiny():
    return zoo.distilbert("tiny")


@pytest.fixture(scope="module")
def compiled(tiny):
    return crowdgraph.compile(tiny, partitions=2, input_shapes=SHAPES)


@pytest.mark.parametrize("budget", ["abc", -5, True, float("nan"), float("inf"), "", "1e3MB", 10**30])
def test_bad_budget(tiny, budget):
    with pytest.raises(InputError, match="byte size"):
        crowdgraph.compile(tiny, budget, input_shapes=SHAPES)


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_bad_partition_count(tiny, count):
    with pytest.raises(InputError, match="partitions must be a whole number of at least 1"):
        crowdgraph.compile(tiny, partitions=count, input_shapes=SHAPES)


@pytest.mark.parametrize("microbatch", [1.5, 0, -2, True, "four"])
def test_bad_microbatch(tiny, compiled, microbatch):
    with pytest.raises(InputError, match="microbatch must be a whole number of rows"):
        compiled.run(zoo.sample_inputs(tiny, batch=2, sequence=16), microbatch=microbatch)


def test_a_bare_array_is_not_a_batch(compiled):
    with pytest.raises(InputError, match="the batch must map input names to arrays, got ndarray"):
        compiled.run(np.ones((1, 16), dtype=np.int64))


def _edited_plan(compiled, tmp_path, edit):
    folder = compiled.save(tmp_path / "plan")
    meta = json.loads((folder / "plan.json").read_text())
    edit(meta["partitions"][0])
    (folder / "plan.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/p0.onnx", ".hidden.onnx", 7])
def test_plan_file_outside_the_folder_is_refused(compiled, tmp_path, name):
    folder = _edited_plan(compiled, tmp_path, lambda p: p.update(file=name))
    with pytest.raises(PlanError, match="not a plain .onnx file name inside the plan folder"):
        crowdgraph.load(folder)


def test_plan_without_sha256(compiled, tmp_path):
    folder = _edited_plan(compiled, tmp_path, lambda p: p.pop("sha256"))
    with pytest.raises(PlanError, match="is not as crowdgraph wrote it .KeyError: 'sha256'"):
        crowdgraph.load(folder)


def test_save_onto_a_file(compiled, tmp_path):
    (tmp_path / "plan").write_text("x")
    with pytest.raises(PlanError, match="is a file; give a new or empty folder"):
        compiled.save(tmp_path / "plan")


def test_save_where_nothing_can_be_written(compiled, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PlanError, match="cannot write a plan folder at"):
        compiled.save(tmp_path / "file" / "plan")

