"""One exception tree for everything crowdgraph raises.

Every message says what was wrong and what to do next.  Errors from
onnx, onnxruntime, sockets or Dask are translated into these at the
boundary where they happen, so callers need to catch only
:class:`CrowdgraphError`.
"""

from __future__ import annotations


class CrowdgraphError(Exception):
    """Base class of every error crowdgraph raises."""


class ModelError(CrowdgraphError):
    """The model cannot be read, is not valid ONNX, or cannot be lowered."""


class PlanError(ModelError):
    """A plan folder cannot be written where asked, or is not one crowdgraph wrote."""


class InputError(CrowdgraphError, ValueError):
    """Inputs (names, dtypes, ranks, batch sizes) do not match the model."""


class BudgetError(CrowdgraphError):
    """A memory budget cannot be met: a node, partition or crowd is too small."""


class PlanningError(CrowdgraphError):
    """The run cannot be planned on the given crowd (before anything runs)."""


class ExecutionError(CrowdgraphError):
    """A task failed while running; names the partition, micro-batch and worker."""


class WorkerLostError(ExecutionError):
    """Workers were lost and no remaining worker can finish the run."""


class ProtocolError(CrowdgraphError):
    """A peer sent bytes that break the wire protocol; that connection is closed."""


class AuthenticationError(ProtocolError):
    """A peer failed the shared-token handshake."""


class ExecutorNotFound(CrowdgraphError, LookupError):
    """``executor=`` names no installed executor."""


class MissingExtraError(CrowdgraphError, ImportError):
    """An optional feature needs a package that is not installed; names the extra to install."""
