"""Generate tokens with a decoder model across the crowd.

A decoder is run once per new token: the first step (the *prefill*) reads
the whole prompt, every later step reads the one token chosen last, and
the key/value cache carries what attention needs from earlier tokens.
This module holds the parts that do not depend on where the model runs:

* :func:`decoder_layout` finds the cache in the model's inputs and
  outputs, by the names Hugging Face Optimum exports
  (``past_key_values.{i}.key`` fed, ``present.{i}.key`` produced);
* :func:`generation_shapes` gives the shapes a plan is cut at so that
  every step up to ``max_length`` tokens fits the budget, cache included;
* :func:`pick_tokens` chooses the next token of each sequence from its
  logits (greedy, or seeded temperature / top-k / top-p sampling);
* :func:`decode` is the loop itself, over any ``step`` function that runs
  the model on a batch: :meth:`~crowdgraph.CompiledModel.generate` passes
  one that runs the plan on an executor, a test passes one whole
  onnxruntime session, and both must choose the same tokens.

Sampling happens on the driver, so tokens never depend on which worker
ran what.  Sequences that finish (an end or stop id, or the length limit)
leave the batch at once: later steps run on the remaining rows only.

Where the cache lives
---------------------
Each step's ``present`` outputs are the next step's ``past`` inputs.  A
layer's past and present always belong to the same partition: they are
read and written by the same ``Concat`` node, and
:func:`check_cache_partitions` refuses a plan where they are not.  So the
cache is state of its partition: with a plan compiled with
``max_length``, each worker keeps the cache of the layers it runs, when
its budget has room, and a :class:`~crowdgraph.state.StateBook` records
where every cache is and rebuilds one lost with its worker.  Otherwise the
cache travels with each step, through the driver.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError, ModelError

__all__ = [
    "CachePair",
    "DecoderLayout",
    "Sampling",
    "GenerationStep",
    "GenerationReport",
    "decoder_layout",
    "feed_cache_shapes",
    "generation_shapes",
    "check_cache_partitions",
    "pick_tokens",
    "left_padded",
    "decode",
    "largest_fitting_length",
    "generate",
    "simulate_generation",
]

#: Axis of the sequence in a cache tensor ``[batch, heads, sequence, head_dim]``.
CACHE_SEQUENCE_AXIS = 2


#: Suffix of the input that carries a cache input's shape (see :func:`feed_cache_shapes`).
SHAPE_SUFFIX = ".shape"


@dataclass(frozen=True)
class CachePair:
    """One cache tensor: the input it is fed as and the output it comes back as.

    ``shape`` names the input that carries the past's shape, in a model
    that reads it (:func:`feed_cache_shapes`).
    """

    past: str
    present: str
    shape: str | None = None


@dataclass(frozen=True)
class DecoderLayout:
    """Which of a decoder's inputs and outputs play which part in generation."""

    input_ids: str
    logits: str
    attention_mask: str | None = None
    position_ids: str | None = None
    cache: tuple[CachePair, ...] = ()


def decoder_layout(inputs: Sequence[str], outputs: Sequence[str],
                   logits_dims: Sequence[Any] | None = None) -> DecoderLayout:
    """The generation roles of a decoder's input and output names.

    The names are those of Hugging Face Optimum's ``text-generation`` and
    ``text-generation-with-past`` exports; a model without cache inputs is
    run by recomputing the whole prefix at every step.  ``logits_dims``,
    when known, must be ``[batch, sequence, vocab]``.

    >>> layout = decoder_layout(
    ...     ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"],
    ...     ["logits", "present.0.key", "present.0.value"])
    >>> layout.position_ids is None, [p.present for p in layout.cache]
    (True, ['present.0.key', 'present.0.value'])
    """
    if "input_ids" not in inputs or "logits" not in outputs:
        raise ModelError(
            f"this model is not a decoder crowdgraph can generate with: it needs an input 'input_ids' "
            f"and an output 'logits' (its inputs are {list(inputs)}, outputs {list(outputs)}); "
            "export it with Optimum's text-generation task"
        )
    if logits_dims is not None and len(logits_dims) != 3:
        raise ModelError(
            f"this model's logits have dims {list(logits_dims)}, not [batch, sequence, vocab]: it is not a "
            "decoder (a classifier?); generation needs a language-model head"
        )
    pairs = []
    for name in inputs:
        if not name.startswith("past_key_values.") or name.endswith(SHAPE_SUFFIX):
            continue
        present = "present." + name[len("past_key_values."):]
        if present not in outputs:
            raise ModelError(
                f"the cache input {name!r} has no matching output {present!r}; generation feeds each "
                "present.* output back as its past_key_values.* input"
            )
        shape = name + SHAPE_SUFFIX
        pairs.append(CachePair(name, present, shape if shape in inputs else None))
    known = {"input_ids", "attention_mask", "position_ids", *(p.past for p in pairs),
             *(p.shape for p in pairs if p.shape)}
    other = [name for name in inputs if name not in known]
    if other:
        raise ModelError(
            f"generation does not know what to feed the model's inputs {other}; it feeds input_ids, "
            "attention_mask, position_ids and past_key_values.*"
        )
    return DecoderLayout(
        input_ids="input_ids",
        logits="logits",
        attention_mask="attention_mask" if "attention_mask" in inputs else None,
        position_ids="position_ids" if "position_ids" in inputs else None,
        cache=tuple(pairs),
    )


def feed_cache_shapes(model: Any, layout: DecoderLayout) -> Any:
    """``model`` with every ``Shape`` of a cache input reading an empty stand-in instead.

    Some exports (Optimum's Llama) take the cache's length from
    ``Shape(past_key_values.0.key)`` at the start of the graph, far from
    the ``Concat`` that appends to the cache, so the partition computing
    the mask would need the whole cache as an input.  A new input
    ``<past>.shape`` of dims ``[batch, heads, past, 0]`` stands in for it:
    it holds no bytes, :func:`decode` feeds it beside (or instead of) the
    cache, and its ``Shape`` plus ``[0, 0, 0, head_dim]`` is the cache's.
    Returns a copy, or ``model`` itself when no ``Shape`` reads a cache
    input.
    """
    import onnx
    from onnx import helper, numpy_helper

    pasts = {pair.past: pair for pair in layout.cache}
    if not any(n.op_type == "Shape" and n.input[0] in pasts for n in model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    declared = {vi.name: vi for vi in graph.input}
    nodes: list[Any] = []
    added: set[str] = set()
    for node in graph.node:
        if node.op_type != "Shape" or node.input[0] not in pasts:
            nodes.append(node)
            continue
        past = declared[node.input[0]]
        stub = past.name + SHAPE_SUFFIX
        if stub not in added:
            stand_in = graph.input.add()
            stand_in.CopyFrom(past)
            stand_in.name = stub
            stand_in.type.tensor_type.shape.dim[3].Clear()
            stand_in.type.tensor_type.shape.dim[3].dim_value = 0
            added.add(stub)
        bounds = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        head_dim = past.type.tensor_type.shape.dim[3].dim_value
        fix = np.array([0, 0, 0, head_dim], np.int64)[bounds.get("start", 0):bounds.get("end", 4)]
        base = node.name or node.output[0]
        graph.initializer.append(numpy_helper.from_array(fix, f"{base}{SHAPE_SUFFIX}.head_dim"))
        nodes.append(helper.make_node("Shape", [stub], [f"{base}{SHAPE_SUFFIX}.out"], name=base,
                                      **{k: v for k, v in bounds.items() if k in ("start", "end")}))
        nodes.append(helper.make_node("Add", [f"{base}{SHAPE_SUFFIX}.out", f"{base}{SHAPE_SUFFIX}.head_dim"],
                                      list(node.output), name=f"{base}{SHAPE_SUFFIX}.add"))
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def generation_shapes(layout: DecoderLayout, cache_dims: Mapping[str, tuple[Any, ...]],
                      max_length: int) -> dict[str, tuple[int, ...]]:
    """Input shapes at which a plan fits every step of a generation.

    A step reads at most ``max_length`` new tokens on top of a cache of at
    most ``max_length`` tokens; tensors only grow with those two lengths,
    so a plan cut at both fits every step: the prefill of the longest
    prompt and the last decoding step with the full cache.  (It is a
    bound, not the exact peak: no real step has both at once.)
    ``cache_dims`` are the declared dims of each cache input; all but the
    batch and sequence axes must be fixed numbers.

    >>> layout = decoder_layout(["input_ids", "attention_mask", "past_key_values.0.key"],
    ...                         ["logits", "present.0.key"])
    >>> generation_shapes(layout, {"past_key_values.0.key": ("batch", 4, "past", 16)}, 32)
    {'input_ids': (1, 32), 'attention_mask': (1, 64), 'past_key_values.0.key': (1, 4, 32, 16)}
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise InputError(f"max_length must be a whole number of tokens of at least 1, not {max_length!r}")
    shapes: dict[str, tuple[int, ...]] = {layout.input_ids: (1, max_length)}
    if layout.attention_mask:
        shapes[layout.attention_mask] = (1, 2 * max_length if layout.cache else max_length)
    if layout.position_ids:
        shapes[layout.position_ids] = (1, max_length)
    for pair in layout.cache:
        dims = cache_dims[pair.past]
        fixed = [d for k, d in enumerate(dims) if k not in (0, CACHE_SEQUENCE_AXIS)]
        if len(dims) != 4 or not all(isinstance(d, int) for d in fixed):
            raise ModelError(
                f"cache input {pair.past!r} has dims {list(dims)}; crowdgraph expects [batch, heads, "
                "sequence, head_dim] with fixed heads and head_dim"
            )
        shapes[pair.past] = (1, dims[1], max_length, dims[3])
        if pair.shape:
            shapes[pair.shape] = (1, dims[1], max_length, 0)
    return shapes


def check_cache_partitions(layout: DecoderLayout, partitions: Sequence[Any]) -> None:
    """Refuse a plan that puts a layer's past and present in different partitions.

    The cache is state of the partition that runs its layer: what it reads
    as ``past`` it must write as ``present``.
    """
    for pair in layout.cache:
        readers = [p.name for p in partitions if pair.past in p.inputs]
        writers = [p.name for p in partitions if pair.present in p.outputs]
        if len(writers) != 1 or readers != writers:
            raise ModelError(
                f"cache {pair.past!r} is read by partitions {readers} but {pair.present!r} is written by "
                f"{writers}; generation needs both in one partition (the Concat that appends to the cache)"
            )


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from a row of logits.

    Greedy (the default) takes the largest logit.  With ``do_sample`` the
    logits are divided by ``temperature``, cut to the ``top_k`` largest
    and to the smallest set whose probability reaches ``top_p``, and a
    token is drawn from what is left.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise InputError(f"temperature must be above 0, not {self.temperature!r}; use do_sample=False "
                             "for greedy decoding")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise InputError(f"top_k must be a whole number of at least 1 or None, not {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] or None, not {self.top_p!r}")


def pick_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """The next token of each row of ``logits`` (``[rows, vocab]``).

    Draws use ``rng`` row by row in order, so a seeded generator gives the
    same tokens wherever the logits were computed.  Ties in greedy
    decoding go to the lowest token id, as ``numpy.argmax`` does.

    >>> logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 2.0]], np.float32)
    >>> pick_tokens(logits, Sampling(), np.random.default_rng(0)).tolist()
    [1, 0]
    >>> pick_tokens(logits, Sampling(do_sample=True, top_k=1), np.random.default_rng(0)).tolist()
    [1, 0]
    """
    logits = np.asarray(logits, dtype=np.float64)
    if not sampling.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    tokens = np.empty(len(logits), np.int64)
    for row, values in enumerate(logits / sampling.temperature):
        order = np.argsort(-values, kind="stable")
        if sampling.top_k is not None:
            order = order[: sampling.top_k]
        kept = values[order]
        probs = np.exp(kept - kept.max())
        probs /= probs.sum()
        if sampling.top_p is not None:
            enough = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
            order, probs = order[:enough], probs[:enough] / probs[:enough].sum()
        tokens[row] = order[rng.choice(len(order), p=probs)]
    return tokens


def left_padded(prompts: Any, attention_mask: Any = None, pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as one left-padded ``int64`` array and its attention mask.

    ``prompts`` is a ``[batch, length]`` array (with ``attention_mask``
    zero on the padding, which must be on the left: new tokens are
    appended on the right) or a list of token-id lists of any lengths.

    >>> ids, mask = left_padded([[5, 6, 7], [8]])
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    if isinstance(prompts, np.ndarray) or (
            isinstance(prompts, Sequence) and prompts and not isinstance(prompts[0], Sequence)):
        ids = np.asarray(prompts)
        if ids.ndim == 1:
            ids = ids[None, :]
    elif isinstance(prompts, Sequence) and prompts:
        if attention_mask is not None:
            raise InputError("attention_mask goes with a prompts array; for a list of prompts crowdgraph "
                             "pads them itself")
        longest = max(len(p) for p in prompts)
        if longest == 0:
            raise InputError("every prompt is empty; give each at least one token id")
        ids = np.full((len(prompts), longest), pad_token_id, np.int64)
        mask = np.zeros((len(prompts), longest), np.int64)
        for row, prompt in enumerate(prompts):
            if len(prompt):
                ids[row, longest - len(prompt):] = prompt
                mask[row, longest - len(prompt):] = 1
        attention_mask = mask
    else:
        raise InputError(f"prompts must be a [batch, length] array of token ids or a list of token-id lists, "
                         f"not {type(prompts).__name__}")
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"prompts must be a [batch, length] array of integer token ids, got shape "
                         f"{list(ids.shape)} and dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int64)
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {list(mask.shape)} but prompts have {list(ids.shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    if (np.diff(mask, axis=1) < 0).any():
        raise InputError("a prompt is padded on the right; pad on the left (new tokens are appended on the "
                         "right), or pass a list of prompts and crowdgraph pads them")
    if (mask.sum(axis=1) == 0).any():
        raise InputError("a prompt has no tokens (its attention_mask is all 0)")
    return ids, mask


@dataclass
class GenerationStep:
    """What one step of :func:`decode` produced.

    ``tokens`` holds the token each sequence got at this step, and
    ``pad_token_id`` for sequences that had already finished;
    ``finished`` is true for every sequence that has ended by now;
    ``logits`` (``[batch, vocab]``) are the scores the tokens were chosen
    from, NaN for sequences that had already finished.
    """

    index: int
    tokens: np.ndarray
    finished: np.ndarray
    logits: np.ndarray


@dataclass
class GenerationReport:
    """How a generation went: steps, tokens and the run report of each step."""

    sequences: int
    steps: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    runs: list[Any] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """New tokens over the wall time of the whole generation."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    #: ``(step, partition, sequence, steps replayed)`` of every cache rebuilt
    #: after its worker was lost or dropped it.
    rebuilt: list[tuple[int, str, int, int]] = field(default_factory=list)
    #: Per worker: the most sequences whose cache it kept at once.
    kept: dict[str, int] = field(default_factory=dict)

    @property
    def lost_workers(self) -> dict[str, str]:
        """Workers lost during the generation, with why."""
        return {name: w.lost for run in self.runs for name, w in run.workers.items() if w.lost}

    @property
    def replaced(self) -> list[tuple[int, str, int]]:
        """``(step, partition, micro-batch)`` of every task run again after its worker was lost.

        The task ran again on another worker with the same inputs and its
        cache: the driver's copy, or one rebuilt (:attr:`rebuilt`).
        """
        return [(step, partition, row) for step, run in enumerate(self.runs) for partition, row in run.replaced]

    def worker_totals(self) -> dict[str, dict[str, float]]:
        """Per worker, over every step: tasks run, busy seconds, peak RSS seen."""
        totals: dict[str, dict[str, float]] = {}
        for run in self.runs:
            for name, w in run.workers.items():
                t = totals.setdefault(name, {"tasks": 0, "busy": 0.0, "peak_rss": 0})
                t["tasks"] += w.tasks
                t["busy"] += w.busy
                t["peak_rss"] = max(t["peak_rss"], w.peak_rss or 0)
        return totals

    def __str__(self) -> str:
        from .units import format_bytes

        lines = [
            f"{self.sequences} sequences, {self.prompt_tokens} prompt tokens, {self.tokens} new tokens in "
            f"{self.steps} steps, {self.seconds:.3g} s: {self.tokens_per_second:.3g} tokens/s",
            "",
            f"{'worker':<12} {'tasks':>6} {'busy s':>8} {'peak RSS':>10} {'caches kept':>12}",
        ]
        for name, t in sorted(self.worker_totals().items()):
            peak = format_bytes(int(t["peak_rss"])) if t["peak_rss"] else "-"
            lines.append(f"{name:<12} {int(t['tasks']):>6} {t['busy']:>8.3g} {peak:>10} {self.kept.get(name, 0):>12}")
        for name, why in self.lost_workers.items():
            lines.append(f"lost {name}: {why}")
        if self.replaced:
            lines.append(f"{len(self.replaced)} tasks run again elsewhere: "
                         + ", ".join(f"step {s} {p} sequence {r}" for s, p, r in self.replaced[:6])
                         + (" ..." if len(self.replaced) > 6 else ""))
        if self.rebuilt:
            lines.append(f"{len(self.rebuilt)} caches rebuilt by replaying their partition: "
                         + ", ".join(f"step {s} {p} sequence {r} ({n} steps)" for s, p, r, n in self.rebuilt[:6])
                         + (" ..." if len(self.rebuilt) > 6 else ""))
        return "\n".join(lines)


def decode(step: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]], layout: DecoderLayout,
           cache_dims: Mapping[str, tuple[int, ...]], input_ids: np.ndarray, attention_mask: np.ndarray, *,
           max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0,
           eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
           report: GenerationReport | None = None, keeps_cache: bool = False) -> Iterator[GenerationStep]:
    """Run the generation loop, yielding each step's tokens as they come.

    ``step(feeds)`` runs the decoder on the active rows and returns at
    least the logits and every ``present`` output.  With a cache, the
    prompt is read once and every later step feeds one token plus the
    cache; without one, every step feeds the whole sequence so far.  With
    ``keeps_cache`` the step keeps the cache itself: no cache is fed, and
    it is called as ``step(feeds, rows)``, ``rows`` being the sequence
    (row of ``input_ids``) of each fed row.
    ``eos_token_id`` (one id or several stop ids) ends a sequence, which
    then leaves the batch; ``max_new_tokens`` ends them all.
    ``cache_dims`` maps each cache input to its ``(heads, head_dim)``.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a whole number of at least 1, not {max_new_tokens!r}")
    stops = np.array([] if eos_token_id is None else np.ravel(eos_token_id), np.int64)
    rng = np.random.default_rng(seed)
    rows = len(input_ids)
    active = np.arange(rows)
    finished = np.zeros(rows, bool)
    tokens_so_far, mask = input_ids, attention_mask
    cache = {} if keeps_cache else empty_caches(layout, cache_dims, rows)
    new_ids = input_ids
    started = time.perf_counter()
    for index in range(max_new_tokens):
        if layout.cache and index > 0:
            fed_ids, fed_mask = new_ids, mask[active]
            positions = fed_mask.sum(axis=1, keepdims=True) - 1
        else:
            fed_ids, fed_mask = tokens_so_far[active], mask[active]
            positions = np.maximum(np.cumsum(fed_mask, axis=1) - 1, 0)
        feeds = {layout.input_ids: fed_ids, **cache}
        past = tokens_so_far.shape[1] - fed_ids.shape[1]  # tokens in the cache
        for pair in layout.cache:
            if pair.shape:  # the cache's shape, in no bytes
                feeds[pair.shape] = np.zeros((len(fed_ids), cache_dims[pair.past][0], past, 0), np.float32)
        if layout.attention_mask:
            feeds[layout.attention_mask] = fed_mask
        if layout.position_ids:
            feeds[layout.position_ids] = positions.astype(np.int64)
        outputs = step(feeds, active) if keeps_cache else step(feeds)
        last = np.asarray(outputs[layout.logits])[:, -1, :]
        chosen = pick_tokens(last, sampling, rng)
        tokens = np.full(rows, pad_token_id, np.int64)
        tokens[active] = chosen
        logits = np.full((rows, last.shape[-1]), np.nan, last.dtype)
        logits[active] = last
        ended = np.isin(chosen, stops)
        finished[active[ended]] = True
        tokens_so_far = np.concatenate([tokens_so_far, tokens[:, None]], axis=1)
        mask = np.concatenate([mask, np.isin(np.arange(rows), active)[:, None].astype(np.int64)], axis=1)
        if report is not None:
            report.steps += 1
            report.tokens += len(active)
            report.seconds = time.perf_counter() - started
        if index + 1 == max_new_tokens:
            finished[:] = True
        yield GenerationStep(index, tokens, finished.copy(), logits)
        keep = ~ended
        active, new_ids = active[keep], chosen[keep][:, None]
        if not keeps_cache:
            cache = {pair.past: np.asarray(outputs[pair.present])[keep] for pair in layout.cache}
        if not len(active):
            return


def empty_caches(layout: DecoderLayout, cache_dims: Mapping[str, tuple[int, ...]], rows: int) -> dict[str, np.ndarray]:
    """The cache inputs before the first step: ``rows`` sequences with no token cached.

    >>> layout = decoder_layout(["input_ids", "past_key_values.0.key"], ["logits", "present.0.key"])
    >>> empty_caches(layout, {"past_key_values.0.key": (4, 16)}, 2)["past_key_values.0.key"].shape
    (2, 4, 0, 16)
    """
    return {pair.past: np.zeros((rows, cache_dims[pair.past][0], 0, cache_dims[pair.past][1]), np.float32)
            for pair in layout.cache}


def largest_fitting_length(model: Any, layout: DecoderLayout, cache_dims: Mapping[str, tuple[Any, ...]],
                           budget: int, max_length: int) -> int | None:
    """The longest generation below ``max_length`` whose every step fits ``budget`` (None: not even 1).

    Memory only grows with the length, so a bisection over
    :func:`~crowdgraph.split.smallest_budget` finds it.
    """
    from .split import smallest_budget

    def fits(length: int) -> bool:
        return smallest_budget(model, generation_shapes(layout, cache_dims, length)) <= budget

    low, high = 0, max_length - 1
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low or None


def generate(compiled: Any, prompts: Any, *, max_new_tokens: int, attention_mask: Any = None,
             executor: Any = "threads", stream: bool = False, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
             mode: str = "streaming", policy: str = "pipeline",
             timeout: float | None = None, keep_caches: bool = True) -> Any:
    """What :meth:`crowdgraph.CompiledModel.generate` does (see there)."""
    from .executor import resolve_executor

    layout = compiled.decoder_layout
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    ids, mask = left_padded(prompts, attention_mask, pad_token_id)
    limit = compiled.max_length
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise InputError(
            f"a prompt of {ids.shape[1]} tokens plus {max_new_tokens} new ones is longer than the "
            f"max_length={limit} the plan was compiled for; compile with a larger max_length or ask for "
            "fewer tokens"
        )
    cache_dims = {spec.name: (spec.dims[1], spec.dims[3]) for spec in compiled.inputs
                  if spec.name in {pair.past for pair in layout.cache}}
    report = GenerationReport(sequences=len(ids), prompt_tokens=int(mask.sum()))
    compiled.last_report = report

    book = _state_book(compiled, layout, cache_dims) if keep_caches else None
    generation = next(_generations)

    def steps() -> Iterator[GenerationStep]:
        ex, owned = resolve_executor(executor)
        alive: list[int] = []

        def step(feeds: dict[str, np.ndarray], rows: Sequence[int] = ()) -> Mapping[str, np.ndarray]:
            if book is None:
                outputs = compiled.run(feeds, ex, microbatch=1, mode=mode, seed=seed, policy=policy,
                                       timeout=timeout)
                run_report = compiled.last_report
            else:
                keys = [f"{generation}.{row}" for row in rows]
                if not alive:
                    for key in keys:
                        book.add_sequence(key, empty_caches(layout, cache_dims, 1))
                _forget(ex, book.drop([f"{generation}.{row}" for row in alive if row not in rows]))
                alive[:] = rows
                outputs, run_report = _run_step(compiled, feeds, keys, book, ex, mode=mode, seed=seed,
                                                policy=policy, timeout=timeout)
                for worker, n in Counter(book.where.values()).items():  # a worker keeps its one partition's
                    report.kept[worker] = max(report.kept.get(worker, 0), n)
            report.runs.append(run_report)
            compiled.last_report = report
            return outputs

        try:
            yield from decode(step, layout, cache_dims, ids, mask, max_new_tokens=max_new_tokens,
                              sampling=sampling, seed=seed, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id, report=report, keeps_cache=book is not None)
        finally:
            if book is not None:
                report.rebuilt = [(s, p, int(key.split(".")[1]), n) for s, p, key, n in book.rebuilt]
                _forget(ex, book.drop(list(book.initial)))
            if owned:
                ex.close()

    if stream:
        return steps()
    new = [s.tokens for s in steps()]
    return np.concatenate([ids, np.stack(new, axis=1)], axis=1)


#: Numbers generations, so that state keys of two generations never meet on a worker.
_generations = itertools.count()


def _state_book(compiled: Any, layout: DecoderLayout, cache_dims: Mapping[str, tuple[int, int]]) -> Any:
    """The ledger of where each cache is, for a plan whose every step runs at its compiled shapes.

    None for a model without a cache, or a plan compiled without
    ``max_length`` (its steps may be cut again at their own shapes, so no
    partition is the same from one step to the next): the cache then
    travels with each step.
    """
    from .state import StateBook

    if not layout.cache or compiled.max_length is None:
        return None
    dtype = {spec.name: spec.dtype for spec in compiled.inputs}
    pairs = {p.name: tuple((pair.present, pair.past) for pair in layout.cache if pair.past in p.inputs)
             for p in compiled.partitions}
    state_bytes = {p: sum(cache_dims[past][0] * compiled.max_length * cache_dims[past][1] * dtype[past].itemsize
                          for _, past in v) for p, v in pairs.items()}
    read = {name for p in compiled.partitions for name in p.inputs}
    return StateBook(pairs, state_bytes, frozenset(pair.present for pair in layout.cache if pair.present in read))


def _run_step(compiled: Any, feeds: Mapping[str, np.ndarray], keys: Sequence[str], book: Any, executor: Any,
              **options: Any) -> tuple[dict[str, np.ndarray], Any]:
    """One step, one micro-batch per sequence, the caches where ``book`` says."""
    from .driver import Driver
    from .taskgraph import join_outputs

    microbatches = [{name: value[row:row + 1] for name, value in feeds.items()} for row in range(len(keys))]
    book.begin(keys)
    outputs, run_report = Driver(compiled, microbatches, executor, state=book, **options).run()
    assert outputs is not None
    return join_outputs(outputs, list(outputs[0])), run_report


def _forget(executor: Any, kept: Mapping[str, Sequence[str]]) -> None:
    """Tell each worker to drop the caches it keeps under these keys."""
    for worker, keys in kept.items():
        executor.forget_state(worker, keys)


def step_shapes(layout: DecoderLayout, cache_dims: Mapping[str, tuple[int, int]], sequence: int,
                past: int) -> dict[str, tuple[int, ...]]:
    """Input shapes of one step for one sequence: ``sequence`` new tokens on ``past`` cached ones.

    >>> layout = decoder_layout(["input_ids", "attention_mask", "past_key_values.0.key"],
    ...                         ["logits", "present.0.key"])
    >>> step_shapes(layout, {"past_key_values.0.key": (4, 16)}, 1, 9)
    {'input_ids': (1, 1), 'attention_mask': (1, 10), 'past_key_values.0.key': (1, 4, 9, 16)}
    """
    shapes: dict[str, tuple[int, ...]] = {layout.input_ids: (1, sequence)}
    if layout.attention_mask:
        shapes[layout.attention_mask] = (1, past + sequence)
    if layout.position_ids:
        shapes[layout.position_ids] = (1, sequence)
    for pair in layout.cache:
        heads, head_dim = cache_dims[pair.past]
        shapes[pair.past] = (1, heads, past, head_dim)
        if pair.shape:
            shapes[pair.shape] = (1, heads, past, 0)
    return shapes


def simulate_generation(compiled: Any, crowd: Sequence[Any], *, sequences: int, prompt_length: int,
                        new_tokens: int, cost: Any = None, policy: str = "pipeline", seed: int = 0,
                        keep_caches: bool = True) -> GenerationReport:
    """How many tokens per second would ``crowd`` generate?  In virtual seconds, like :func:`crowdgraph.simulate`.

    Every step is simulated at its own shapes (the prefill reads the
    prompt, step ``k`` one token on a cache of ``prompt_length + k - 1``),
    one micro-batch per sequence, and the crowd carries what it holds and
    has cached from one step to the next.  The caches stay on the workers
    (their bytes are on no link) when :meth:`~crowdgraph.CompiledModel.generate`
    would keep them there: ``keep_caches``, a worker for every partition,
    and every budget with room for every sequence's cache of the largest
    partition with one; otherwise they travel with each step's tensors.
    """
    from dataclasses import replace

    from .compiled import CompiledModel
    from .lower import lower
    from .partition import node_flops
    from .simulation import simulate

    if compiled._source is None:
        raise InputError("simulate_generation needs a plan compiled in this process (a saved plan has no model "
                         "to cost its steps at their shapes); compile the model with max_length=")
    layout = compiled.decoder_layout
    if layout.cache and prompt_length + new_tokens > (compiled.max_length or prompt_length + new_tokens):
        raise InputError(f"prompt_length + new_tokens is above the plan's max_length={compiled.max_length}")
    cache_dims = {spec.name: (spec.dims[1], spec.dims[3]) for spec in compiled.inputs
                  if spec.name in {pair.past for pair in layout.cache}}
    report = GenerationReport(sequences=sequences, prompt_tokens=sequences * prompt_length)
    crowd = list(crowd)
    book = _state_book(compiled, layout, cache_dims) if keep_caches else None
    if book is not None and len(crowd) >= len(compiled.partitions):
        need = max((p.resident_bytes + (sequences - 1) * book.state_bytes[p.name] for p in compiled.partitions
                    if p.name in book.pairs), default=0)
        stays = {name for name in book.outputs | {i for v in book.inputs.values() for i in v}
                 if name not in book.shared} if all(w.memory >= need for w in crowd) else set()
    else:
        stays = set()
    for step in range(new_tokens):
        if not layout.cache:
            shapes = step_shapes(layout, cache_dims, prompt_length + step, 0)
        elif step == 0:
            shapes = step_shapes(layout, cache_dims, prompt_length, 0)
        else:
            shapes = step_shapes(layout, cache_dims, 1, prompt_length + step - 1)
        og = lower(compiled._source.model, shapes)
        nodes = {node.name: node for node in og.nodes}
        parts = [replace(p, flops=sum(node_flops(og, nodes[n]) for n in p.nodes if n in nodes),
                         input_bytes=sum(og.nbytes(t) for t in p.inputs if t not in stays),
                         output_bytes=sum(og.nbytes(t) for t in p.outputs if t not in stays))
                 for p in compiled.partitions]
        plan = CompiledModel(parts, compiled.inputs, compiled.outputs, compiled.input_shapes, compiled.memory_budget)
        run = simulate(plan, crowd, {k: (sequences, *v[1:]) for k, v in shapes.items()}, microbatch=1,
                       cost=cost, policy=policy, seed=seed)
        report.runs.append(run)
        report.steps += 1
        report.tokens += sequences
        report.seconds += run.makespan
        crowd = [_carried(w, run) for w in crowd]
    return report


def _carried(worker: Any, run: Any) -> Any:
    """``worker`` as it is after ``run``: holding its last load, with every load cached."""
    from dataclasses import replace

    loads = sorted((load.end, load.partition) for load in run.loads if load.worker == worker.id)
    if not loads:
        return worker
    return replace(worker, resident=loads[-1][1], cached=frozenset(worker.cached) | {p for _, p in loads})
