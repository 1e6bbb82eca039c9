"""crowdgraph: run one ONNX model across a crowd of small machines.

>>> import crowdgraph
>>> compiled = crowdgraph.compile("model.onnx", memory_budget="48MB")   # doctest: +SKIP
>>> outputs = compiled.run(batch, executor="threads")                  # doctest: +SKIP
"""

from .compiled import CompiledModel, TensorSpec, compile, load
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
from .partition import Partition
from .units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError", "BudgetError", "CompiledModel", "CrowdgraphError",
    "ExecutionError", "ExecutorNotFound", "InputError", "ModelError", "Partition",
    "PlanningError", "ProtocolError", "TensorSpec", "WorkerLostError", "compile",
    "format_bytes", "load", "parse_bytes",
]
