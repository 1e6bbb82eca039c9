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
from .executor import Executor, Job, Reporter
from .partition import Partition
from .report import RunReport
from .schedule import WorkerInfo
from .simulate import CostModel, SimulatedExecutor, simulate
from .threads import ThreadExecutor
from .units import format_bytes, parse_bytes

#: A worker of the crowd: ``Worker("phone1", memory="64MB", speed=0.8)``.
Worker = WorkerInfo

__version__ = "0.1.0"

__all__ = [
    "CostModel", "Executor", "Job", "Reporter", "RunReport", "SimulatedExecutor",
    "ThreadExecutor", "Worker", "WorkerInfo", "simulate",
    "AuthenticationError", "BudgetError", "CompiledModel", "CrowdgraphError",
    "ExecutionError", "ExecutorNotFound", "InputError", "ModelError", "Partition",
    "PlanningError", "ProtocolError", "TensorSpec", "WorkerLostError", "compile",
    "format_bytes", "load", "parse_bytes",
]
