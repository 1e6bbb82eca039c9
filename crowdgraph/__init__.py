"""crowdgraph: run one ONNX model across a crowd of small machines.

>>> import crowdgraph
>>> compiled = crowdgraph.compile("model.onnx", memory_budget="48MB")   # doctest: +SKIP
>>> outputs = compiled.run(batch, executor="threads")                  # doctest: +SKIP

Names are imported on first use, so a worker that needs only
``crowdgraph.wire`` and ``crowdgraph.runtime`` does not pay for onnx and
networkx in its memory floor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AuthenticationError,
    BudgetError,
    CrowdgraphError,
    ExecutionError,
    ExecutorNotFound,
    InputError,
    ModelError,
    PlanningError,
    ProtocolError,
    WorkerLostError,
)
from .units import format_bytes, parse_bytes

__version__ = "0.1.0"

#: Public name -> module that defines it.
_LAZY = {
    "CompiledModel": "compiled", "TensorSpec": "compiled", "compile": "compiled", "load": "compiled",
    "Executor": "executor", "Job": "executor", "Reporter": "executor", "TaskStats": "executor",
    "GenerationReport": "generate", "simulate_generation": "generate",
    "Partition": "partition",
    "RunReport": "report",
    "WorkerInfo": "schedule",
    "CostModel": "simulation", "SimulatedExecutor": "simulation", "simulate": "simulation",
    "ThreadExecutor": "threads",
}

__all__ = sorted([
    *_LAZY, "AuthenticationError", "BudgetError", "CrowdgraphError", "ExecutionError", "ExecutorNotFound",
    "InputError", "ModelError", "PlanningError", "ProtocolError", "WorkerLostError", "format_bytes",
    "parse_bytes",
])


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'crowdgraph' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from .compiled import CompiledModel, TensorSpec, compile, load
    from .executor import Executor, Job, Reporter, TaskStats
    from .generate import GenerationReport, simulate_generation
    from .partition import Partition
    from .report import RunReport
    from .schedule import WorkerInfo
    from .simulation import CostModel, SimulatedExecutor, simulate
    from .threads import ThreadExecutor
