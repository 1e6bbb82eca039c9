"""Spot checks: which results to check again elsewhere, and who lied.

A worker that returns plausible numbers of the right shape (a bug, a broken
NPU driver, a cheater) passes every shape and dtype check.  With
``compiled.run(..., audit=rate)`` the driver runs a seeded fraction of the
tasks a second time on another worker and compares the two results; on a
disagreement a third worker decides, the odd one out is quarantined and
every result that depended on its unchecked outputs is computed again.

This module is the decision logic of that, on plain data (no I/O, no
clock; randomness only from a seed): which task to check
(:func:`audit_rate`, :func:`chosen_for_audit`), whether two results agree
(:func:`results_agree`, with :func:`tolerance` per dtype), who the odd
one out is (:func:`vote`), what must be computed again
(:func:`tainted`), and each worker's record (:class:`Reputation`).  The
driver (:mod:`crowdgraph.driver`) carries the decisions out; see
docs/audit.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Mapping, Sequence

import networkx as nx
import numpy as np

from .schedule import TaskKey

#: Largest difference two honest float results may show, as a fraction of
#: the larger magnitude in the tensor (at least 1.0).  Two onnxruntime
#: sessions differ run-to-run and across intra-op thread counts by the
#: order of their reductions alone: tests/test_audit.py measures that on
#: the tiny DistilBERT (no difference) and a 256-wide MatMul chain (under
#: 1e-6 of the magnitude in float32) and requires 20x headroom.  A change
#: a cheater or a broken driver makes to numbers that matter is far larger;
#: one smaller than these bounds goes unnoticed (docs/audit.md).
FLOAT_TOLERANCE: Mapping[str, float] = {"float16": 1e-2, "bfloat16": 1e-2, "float32": 1e-4, "float64": 1e-9}

#: Checks a worker must pass before its tasks are checked at the base rate.
PROVEN_AFTER = 3
#: An unproven worker's tasks are checked this many times as often.
UNPROVEN_FACTOR = 2.0


@dataclass
class Reputation:
    """What one worker has shown in this run, counted from events.

    ``passed``: checks of its results (or by it) that agreed;
    ``disagreements``: checks it was on the losing side of, or not yet decided;
    ``failures``: times it was lost (gone, or dropped for a malformed
    result); ``stragglers``: tasks it was so slow at that they got a
    backup copy.
    """

    passed: int = 0
    disagreements: int = 0
    failures: int = 0
    stragglers: int = 0

    @property
    def proven(self) -> bool:
        """Passed enough checks and lost none.

        >>> Reputation(passed=3).proven, Reputation(passed=5, disagreements=1).proven
        (True, False)
        """
        return self.passed >= PROVEN_AFTER and not self.disagreements


def audit_rate(base: float, record: Reputation) -> float:
    """Fraction of a worker's results to check, given the run's ``audit=`` rate.

    A worker under suspicion (a disagreement not yet cleared) has every
    result checked; an unproven one :data:`UNPROVEN_FACTOR` times as
    many as the base rate; ``audit=0`` checks nothing.

    >>> audit_rate(0.05, Reputation()), audit_rate(0.05, Reputation(passed=3))
    (0.1, 0.05)
    >>> audit_rate(0.05, Reputation(passed=9, disagreements=1)), audit_rate(0.0, Reputation(disagreements=1))
    (1.0, 0.0)
    """
    if base <= 0:
        return 0.0
    if record.disagreements:
        return 1.0
    if not record.proven:
        return min(1.0, UNPROVEN_FACTOR * base)
    return min(1.0, base)


def chosen_for_audit(seed: int, key: TaskKey, worker: str, rate: float) -> bool:
    """Whether the result of ``key`` from ``worker`` is checked: a seeded coin
    of probability ``rate``, the same for the same arguments in any process.

    >>> chosen_for_audit(0, ("p0", 3), "w1", 1.0), chosen_for_audit(0, ("p0", 3), "w1", 0.0)
    (True, False)
    """
    digest = hashlib.blake2b(f"{seed}\0{key[0]}\0{key[1]}\0{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


def tolerance(dtype: Any) -> float:
    """Allowed difference between two honest results of ``dtype``, relative to
    the larger magnitude in the tensor: 0 (exact) for integers and booleans.

    >>> tolerance(np.int64), tolerance(np.float32)
    (0.0, 0.0001)
    """
    return FLOAT_TOLERANCE.get(np.dtype(dtype).name, 0.0)


def arrays_agree(a: Any, b: Any) -> bool:
    """Whether two results of one tensor agree within :func:`tolerance`.

    Shapes and dtypes must be equal; NaN agrees only with NaN at the same
    place, infinities only with the same infinity.

    >>> arrays_agree(np.float32([1, 2]), np.float32([1, 2.00001]))
    True
    >>> arrays_agree(np.float32([1, 2]), np.float32([1, np.nan])), arrays_agree(np.int64([1]), np.int64([2]))
    (False, False)
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bound = tolerance(a.dtype)
    if bound == 0.0 or a.size == 0:
        return bool(np.array_equal(a, b))
    x, y = a.astype(np.float64), b.astype(np.float64)
    nan_x, nan_y = np.isnan(x), np.isnan(y)
    if not np.array_equal(nan_x, nan_y):
        return False
    finite = np.isfinite(x) & np.isfinite(y)
    if not np.array_equal(x[~finite & ~nan_x], y[~finite & ~nan_y]):  # the same infinities
        return False
    if not finite.any():
        return True
    scale = max(1.0, float(np.max(np.abs(x[finite]))), float(np.max(np.abs(y[finite]))))
    return float(np.max(np.abs(x[finite] - y[finite]))) <= bound * scale


def results_agree(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two results of one task agree: the same tensor names, each within tolerance.

    >>> results_agree({"y": np.int64([1])}, {"y": np.int64([1])}), results_agree({"y": 1}, {"z": 1})
    (True, False)
    """
    return a.keys() == b.keys() and all(arrays_agree(a[name], b[name]) for name in a)


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check: whose results agree, and the odd ones out."""

    agreed: tuple[str, ...]
    odd: tuple[str, ...]


def vote(results: Sequence[tuple[str, Mapping[str, Any]]]) -> Verdict | None:
    """Decide a check from the results of one task on different workers.

    The first result that another one agrees with wins; every worker whose
    result disagrees with it is odd.  None while no two results agree (ask
    another worker).

    >>> y = {"y": np.int64([1])}
    >>> vote([("a", y), ("b", {"y": np.int64([2])}), ("c", y)])
    Verdict(agreed=('a', 'c'), odd=('b',))
    >>> vote([("a", y), ("b", {"y": np.int64([2])})]) is None
    True
    """
    for i, (_, first) in enumerate(results):
        if any(results_agree(first, other) for j, (_, other) in enumerate(results) if j != i):
            agreed = tuple(w for w, r in results if results_agree(first, r))
            odd = tuple(w for w, r in results if w not in agreed)
            return Verdict(agreed, odd)
    return None


def tainted(tasks: nx.DiGraph, produced_on: Mapping[TaskKey, str], liar: str,
            verified: AbstractSet[TaskKey]) -> set[TaskKey]:
    """Finished tasks to compute again once ``liar`` is found out.

    Every result ``liar`` produced that no check confirmed, and every
    finished task downstream of one (it read a value that may be wrong).

    >>> g = nx.DiGraph([(("a", 0), ("b", 0)), (("a", 1), ("b", 1))])
    >>> sorted(tainted(g, {("a", 0): "x", ("b", 0): "y", ("a", 1): "x", ("b", 1): "y"}, "x", {("a", 1)}))
    [('a', 0), ('b', 0)]
    """
    doubtful = {k for k, w in produced_on.items() if w == liar and k not in verified}
    result = set(doubtful)
    for k in doubtful:
        result.update(d for d in nx.descendants(tasks, k) if d in produced_on)
    return result


def canary_batches(microbatches: Sequence[Mapping[str, np.ndarray]], batched: Sequence[str], count: int,
                   seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` canary micro-batches: the batch's rows in a seeded new order.

    Each has the first micro-batch's rows, drawn without repeats from the
    whole batch, so it is a valid input that no micro-batch of the run
    equals (unless there is only one row to draw); inputs without a batch
    axis are the first micro-batch's.

    >>> mbs = [{"x": np.array([[0], [1]])}, {"x": np.array([[2], [3]])}]
    >>> [c["x"].ravel().tolist() for c in canary_batches(mbs, ["x"], 2, seed=0)]
    [[2, 0], [3, 2]]
    """
    if not batched:
        return [dict(microbatches[0]) for _ in range(count)]
    rows = {name: np.concatenate([mb[name] for mb in microbatches]) for name in batched}
    total, size = len(rows[batched[0]]), len(microbatches[0][batched[0]])
    rng = np.random.default_rng(seed)
    canaries = []
    for _ in range(count):
        order = rng.permutation(total)[:size]
        canaries.append({**microbatches[0], **{name: value[order] for name, value in rows.items()}})
    return canaries


@dataclass
class Disagreement:
    """One check whose results disagreed, and how it was decided."""

    partition: str
    microbatch: int
    workers: tuple[str, ...]  #: who ran it, the original producer first
    odd: tuple[str, ...] = ()  #: whose result lost the vote (empty while undecided)


@dataclass
class AuditSummary:
    """What spot checks did in one run (``compiled.last_report.audit``).

    Attributes
    ----------
    rate:
        The run's ``audit=`` rate.
    checks:
        Results compared with a second worker's.
    disagreements:
        The checks that disagreed, with the vote's outcome.
    quarantined:
        Worker id -> why it was quarantined (no more tasks this run).
    recomputed:
        Tasks computed again because they depended on a quarantined
        worker's unchecked results.
    canaries:
        Results of canary micro-batches compared with what the driver
        computed itself (``run(..., canaries=k)``).
    reputations:
        Each worker's record at the end of the run.
    """

    rate: float
    checks: int = 0
    disagreements: list[Disagreement] = field(default_factory=list)
    quarantined: dict[str, str] = field(default_factory=dict)
    recomputed: int = 0
    reputations: dict[str, Reputation] = field(default_factory=dict)
    canaries: int = 0

    def line(self) -> str:
        """One line for the text report.

        >>> AuditSummary(0.05, checks=4).line()
        'audit at 5%: 4 checks, 0 disagreements, nobody quarantined'
        """
        who = ", ".join(f"{w} ({why})" for w, why in self.quarantined.items()) or "nobody"
        again = f"; {self.recomputed} tasks computed again" if self.recomputed else ""
        again += f"; {self.canaries} canary results checked" if self.canaries else ""
        n = len(self.disagreements)
        return (f"audit at {self.rate:.0%}: {self.checks} checks, {n} disagreement{'' if n == 1 else 's'}, "
                f"{'quarantined ' if self.quarantined else ''}{who}{'' if self.quarantined else ' quarantined'}"
                f"{again}")
