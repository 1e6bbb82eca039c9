"""crowdgraph-dask: a ``dask.distributed`` cluster as crowdgraph's crowd.

crowdgraph still decides who runs what (residency, just-in-time loading,
memory budgets, the four affinity tiers); Dask moves the tensors between
workers and tells crowdgraph when a worker leaves.

>>> from dask.distributed import Client                       # doctest: +SKIP
>>> outputs = compiled.run(batch, executor=Client(cluster))    # doctest: +SKIP
>>> outputs = compiled.run(batch, executor="dask://127.0.0.1:8786")  # doctest: +SKIP

See docs/dask.md.
"""

from ._executor import MEMORY_RESOURCE, DaskExecutor
from ._results import TensorHandle

__all__ = ["DaskExecutor", "MEMORY_RESOURCE", "TensorHandle"]
__version__ = "0.1.0"
