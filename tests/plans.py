"""Compiled plans and oracle outputs shared by the tests of one session (test helpers only).

Compiling is most of what the suite spends: many tests cut the same model
at the same budget and shapes, and run the same whole-model oracle.  A
plan is plain data that a run does not change (a run only records its
report in ``last_report`` and keeps re-planned shapes in a cache), so one
plan can serve every test that reads it.  Tests that change a plan, or
check how ``compile`` itself behaves, call :func:`crowdgraph.compile`.

The key is what decides the result: the model (its sha256, or its
path) and the arguments of ``compile``, or the feeds of the oracle.  At
most :data:`KEEP` of each stay alive.

A full-size plan that several test files compile the same way is shared
across the processes of one run instead (:func:`shared`): the first to
ask compiles it and writes it with :meth:`crowdgraph.CompiledModel.save`
into the run's plan store, the others read it back with
:func:`crowdgraph.load`, so every test reads a plan as crowdgraph
writes and loads it.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx

import crowdgraph
from tests.models import exclusive
from tests.oracle import oracle

#: The environment variable naming the run's plan store, a folder the root conftest.py makes and removes.
STORE_ENV = "CROWDGRAPH_TEST_PLANS"

#: How many plans and how many oracle results the session keeps (meant for small models:
#: a test of a full-size model compiles its own plan, which goes when the test ends).
KEEP = 64

_plans: OrderedDict[tuple, crowdgraph.CompiledModel] = OrderedDict()
_oracles: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()


def model_key(model: onnx.ModelProto | bytes | str | os.PathLike) -> str:
    """What names a model in the caches: the sha256 of its bytes, or its file's path.

    >>> from onnx import helper, TensorProto
    >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    >>> m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["x2"])], "g", [x], []))
    >>> model_key(m) == model_key(m.SerializeToString()) != model_key("m.onnx")
    True
    """
    if isinstance(model, (str, os.PathLike)):
        return f"file {Path(model).resolve()}"  # the tests never change a model file they compile
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return hashlib.sha256(data).hexdigest()


def _remember(cache: OrderedDict, key: tuple, make: Callable[[], Any]) -> Any:
    """The cached value of ``key``, made by ``make()`` the first time; the oldest beyond KEEP go."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    while len(cache) > KEEP:
        cache.popitem(last=False)
    return value


def _shapes(input_shapes: Mapping[str, Iterable[int]] | None,
            sample: Mapping[str, Any] | None) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    if sample is not None:
        input_shapes = {name: np.shape(value) for name, value in sample.items()}
    if input_shapes is None:
        return None
    return tuple(sorted((name, tuple(shape)) for name, shape in input_shapes.items()))


def compiled(model: onnx.ModelProto | str | os.PathLike, memory_budget: int | str | None = None, *,
             partitions: int | None = None, input_shapes: Mapping[str, Iterable[int]] | None = None,
             sample: Mapping[str, Any] | None = None) -> crowdgraph.CompiledModel:
    """``crowdgraph.compile(model, ...)`` with the same arguments, compiled once per session.

    The plan is shared: run it and read it, never change it.

    >>> from tests import models
    >>> model, feeds = models.chain()
    >>> plan = compiled(model, partitions=2, sample=feeds)
    >>> compiled(models.chain()[0], partitions=2, input_shapes={"x": feeds["x"].shape}) is plan
    True
    >>> compiled(model, partitions=3, sample=feeds) is plan
    False
    """
    shapes = _shapes(input_shapes, sample)
    key = (model_key(model), memory_budget, partitions, shapes)
    return _remember(_plans, key, lambda: crowdgraph.compile(
        model, memory_budget, partitions=partitions, input_shapes=None if shapes is None else dict(shapes)))


def expected(model: onnx.ModelProto | str | os.PathLike,
             feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`tests.oracle.oracle` of ``model`` on ``feeds``, run once per session.

    The arrays are shared and read-only, so no test can change what another compares against.

    >>> from tests import models
    >>> model, feeds = models.chain()
    >>> want = expected(model, feeds)
    >>> expected(model, {"x": feeds["x"].copy()}) is want, want["y"].flags.writeable
    (True, False)
    """
    key = (model_key(model),) + tuple(
        sorted((name, value.dtype.str, value.shape, hashlib.sha256(np.ascontiguousarray(value)).hexdigest())
               for name, value in feeds.items()))

    def run() -> dict[str, np.ndarray]:
        outputs = oracle(model, feeds)
        for value in outputs.values():
            value.flags.writeable = False
        return outputs

    return _remember(_oracles, key, run)


def shared(model: onnx.ModelProto | str | os.PathLike, memory_budget: int | str | None = None, *,
           partitions: int | None = None, input_shapes: Mapping[str, Iterable[int]] | None = None,
           sample: Mapping[str, Any] | None = None) -> crowdgraph.CompiledModel:
    """``crowdgraph.compile(model, ...)`` with the same arguments, compiled once per run.

    The first process of the run to ask compiles the plan, saves it in the
    run's plan store (the folder named by :data:`STORE_ENV`) and returns
    it; the others wait for it and return ``crowdgraph.load`` of it.  A
    lock per plan keeps two processes from compiling the same one.  Each
    call returns a plan of its own (nothing stays in memory here: these
    are the full-size plans); run it at the shapes it was compiled at (a
    loaded plan is not cut again for larger ones).  Without a store (a
    test run that did not load the root conftest.py) it is
    ``crowdgraph.compile``.

    >>> from tests import models
    >>> model, feeds = models.chain()
    >>> first, again = (shared(model, partitions=2, sample=feeds) for _ in range(2))
    >>> [p.sha256 for p in first.partitions] == [p.sha256 for p in again.partitions]
    True
    """
    shapes = _shapes(input_shapes, sample)

    def compile_it() -> crowdgraph.CompiledModel:
        return crowdgraph.compile(model, memory_budget, partitions=partitions,
                                  input_shapes=None if shapes is None else dict(shapes))

    store = os.environ.get(STORE_ENV)
    if not store:
        return compile_it()
    key = repr((model_key(model), memory_budget, partitions, shapes))
    folder = Path(store) / hashlib.sha256(key.encode()).hexdigest()[:32]
    with exclusive(f"{folder}.lock"):
        if folder.is_dir():
            return crowdgraph.load(folder)
        plan = compile_it()
        plan.save(folder)
        return plan
