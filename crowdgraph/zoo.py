"""Models that crowdgraph builds itself: a DistilBERT, a GPT-2-shaped decoder and a U-Net, random weights.

Why the project ships its own model
-----------------------------------
The demo and the tests need a real transformer: a graph with embeddings,
shape arithmetic that works for any sequence length, attention with a
padding mask, residual connections, LayerNormalization and tens of
megabytes of weights, so that memory budgets and partitions matter.
Downloading one needs a network and a model hub, and exporting one needs
torch, which is far too heavy a dependency for a library that only runs
ONNX.  So :func:`distilbert` writes the DistilBERT architecture node by
node with :mod:`onnx.helper` and fills it with seeded random weights drawn
with numpy.  Nothing is downloaded and nothing is cached on disk; the full
size (about 67 million parameters, 268 MB of float32) builds in about a
second.

The graph follows ``transformers.DistilBertForSequenceClassification``
in eval mode (dropout is the identity) with the weights of each Linear
stored as ``[in, out]`` for ``MatMul``.  It uses opset 17 (the first with
``LayerNormalization``) and IR version 8, which onnxruntime-web reads too.

>>> model = distilbert("tiny")
>>> [i.name for i in model.graph.input], [o.name for o in model.graph.output]
(['input_ids', 'attention_mask'], ['logits'])
>>> parameter_count(model)
176578
>>> feeds = sample_inputs("tiny", batch=2, sequence=8)
>>> feeds["attention_mask"].tolist()
[[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = [
    "DistilBertSize",
    "SIZES",
    "OPSET",
    "IR_VERSION",
    "distilbert",
    "DecoderSize",
    "DECODER_SIZES",
    "gpt2",
    "sample_inputs",
    "parameter_count",
    "unet",
    "image_inputs",
]

#: Opset of the built models: the first with ``LayerNormalization``.
OPSET = 17
#: IR version of the built models (onnx would otherwise write its newest).
IR_VERSION = 8


@dataclass(frozen=True)
class DistilBertSize:
    """The dimensions of a DistilBERT (names as in ``DistilBertConfig``)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim {self.dim} is not a multiple of n_heads {self.n_heads}; "
                "pick a head count that divides the hidden size"
            )


#: The named sizes. ``full`` is ``DistilBertConfig()``; ``tiny`` builds in
#: milliseconds for fast tests.
SIZES: dict[str, DistilBertSize] = {
    "full": DistilBertSize(
        vocab_size=30522, dim=768, n_layers=6, n_heads=12,
        hidden_dim=3072, max_position_embeddings=512,
    ),
    "tiny": DistilBertSize(
        vocab_size=1000, dim=64, n_layers=2, n_heads=4,
        hidden_dim=256, max_position_embeddings=128,
    ),
}

_INIT_STD = 0.02  # DistilBertConfig.initializer_range
_LN_EPS = 1e-12
_MASK_MIN = float(np.finfo(np.float32).min)


def _size(size: str | DistilBertSize) -> DistilBertSize:
    if isinstance(size, DistilBertSize):
        return size
    try:
        return SIZES[size]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown DistilBERT size {size!r}; use one of {sorted(SIZES)} "
            "or a DistilBertSize"
        ) from None


@dataclass(frozen=True)
class _Constants:
    """Names of the shared constant initializers of a built transformer."""

    zero_i: str
    one_i: str
    one_f: str
    half_f: str
    sqrt2_f: str
    mask_min: str
    scale: str
    axes_12: str
    heads_shape: str
    merge_shape: str


class _Builder:
    """Collects nodes and initializers with unique, meaningful names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[tuple[str, np.ndarray]] = []
        self._names: set[str] = set()

    def init(self, name: str, array: np.ndarray) -> str:
        assert name not in self._names, name
        self._names.add(name)
        self.initializers.append((name, array))
        return name

    def normal(self, name: str, shape: tuple[int, ...], std: float = _INIT_STD) -> str:
        values = self.rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(std)
        return self.init(name, values)

    def near(self, name: str, shape: tuple[int, ...], centre: float) -> str:
        """``centre`` plus a small perturbation (LayerNorm weights, biases)."""
        values = self.rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(_INIT_STD)
        values += np.float32(centre)
        return self.init(name, values)

    def node(self, op: str, name: str, inputs: list[str], **attrs) -> str:
        """Add node ``name`` with one output, also called ``name``; return it."""
        assert name not in self._names, name
        self._names.add(name)
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def linear(self, prefix: str, x: str, n_in: int, n_out: int) -> str:
        w = self.normal(f"{prefix}.weight", (n_in, n_out))
        b = self.near(f"{prefix}.bias", (n_out,), 0.0)
        y = self.node("MatMul", f"{prefix}.MatMul", [x, w])
        return self.node("Add", f"{prefix}.Add", [y, b])

    def gelu(self, prefix: str, x: str, c: "_Constants") -> str:
        """The exact GELU, ``x * (1 + erf(x / sqrt 2)) / 2``."""
        g = self.node("Div", f"{prefix}.Div", [x, c.sqrt2_f])
        g = self.node("Erf", f"{prefix}.Erf", [g])
        g = self.node("Add", f"{prefix}.Add", [g, c.one_f])
        g = self.node("Mul", f"{prefix}.Mul", [x, g])
        return self.node("Mul", f"{prefix}.Half", [g, c.half_f])

    def constants(self, dim: int, heads: int) -> "_Constants":
        """The small constants both transformers use."""
        head_dim = dim // heads
        return _Constants(
            zero_i=self.init("const.zero_int64", np.array(0, np.int64)),
            one_i=self.init("const.one_int64", np.array(1, np.int64)),
            one_f=self.init("const.one_float", np.array(1.0, np.float32)),
            half_f=self.init("const.half_float", np.array(0.5, np.float32)),
            sqrt2_f=self.init("const.sqrt2_float", np.array(math.sqrt(2.0), np.float32)),
            mask_min=self.init("const.mask_min_float", np.array(_MASK_MIN, np.float32)),
            scale=self.init("const.attention_scale", np.array(1.0 / math.sqrt(head_dim), np.float32)),
            axes_12=self.init("const.axes_1_2", np.array([1, 2], np.int64)),
            heads_shape=self.init("const.heads_shape", np.array([0, 0, heads, head_dim], np.int64)),
            merge_shape=self.init("const.merge_shape", np.array([0, 0, dim], np.int64)),
        )

    def layer_norm(self, prefix: str, x: str, dim: int) -> str:
        scale = self.near(f"{prefix}.weight", (dim,), 1.0)
        bias = self.near(f"{prefix}.bias", (dim,), 0.0)
        return self.node(
            "LayerNormalization", f"{prefix}.LayerNormalization",
            [x, scale, bias], axis=-1, epsilon=_LN_EPS,
        )


def distilbert(
    size: str | DistilBertSize = "full", *, seed: int = 0, num_labels: int = 2
) -> onnx.ModelProto:
    """Build a DistilBERT for sequence classification with random weights.

    Inputs are ``input_ids`` and ``attention_mask`` (int64, ``[batch,
    sequence]``, any sequence length up to the position table); the output
    is ``logits`` (float32, ``[batch, num_labels]``).  Weights are drawn
    from ``numpy.random.default_rng(seed)``, so a seed always gives the
    same model.

    >>> m = distilbert("tiny", num_labels=3)
    >>> m.opset_import[0].version, m.ir_version
    (17, 8)
    >>> [d.dim_param or d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
    ['batch', 3]
    """
    cfg = _size(size)
    if num_labels < 1:
        raise ValueError(f"num_labels must be at least 1, got {num_labels}")
    b = _Builder(np.random.default_rng(seed))
    d, h = cfg.dim, cfg.n_heads

    c = b.constants(d, h)
    axes_0 = b.init("const.axes_0", np.array([0], np.int64))

    # Embeddings: word + position (positions 0..sequence-1 from the input's shape).
    word = b.normal("embeddings.word_embeddings.weight", (cfg.vocab_size, d))
    pos_table = b.normal("embeddings.position_embeddings.weight", (cfg.max_position_embeddings, d))
    words = b.node("Gather", "embeddings.word_embeddings.Gather", [word, "input_ids"], axis=0)
    shape = b.node("Shape", "embeddings.position_ids.Shape", ["input_ids"])
    seq_len = b.node("Gather", "embeddings.position_ids.Gather", [shape, c.one_i], axis=0)
    positions = b.node("Range", "embeddings.position_ids.Range", [c.zero_i, seq_len, c.one_i])
    positions = b.node("Unsqueeze", "embeddings.position_ids.Unsqueeze", [positions, axes_0])
    pos = b.node("Gather", "embeddings.position_embeddings.Gather", [pos_table, positions], axis=0)
    x = b.node("Add", "embeddings.Add", [words, pos])
    x = b.layer_norm("embeddings.LayerNorm", x, d)

    # Additive mask bias [batch, 1, 1, sequence]: 0 where attended, float32 min where padded.
    m = b.node("Cast", "attention_mask.Cast", ["attention_mask"], to=TensorProto.FLOAT)
    m = b.node("Sub", "attention_mask.Sub", [c.one_f, m])
    m = b.node("Mul", "attention_mask.Mul", [m, c.mask_min])
    mask_bias = b.node("Unsqueeze", "attention_mask.Unsqueeze", [m, c.axes_12])

    for i in range(cfg.n_layers):
        p = f"layer.{i}"
        a = f"{p}.attention"
        heads = {}
        for proj, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            y = b.linear(f"{a}.{proj}", x, d, d)
            y = b.node("Reshape", f"{a}.{proj}.Reshape", [y, c.heads_shape])
            heads[proj] = b.node("Transpose", f"{a}.{proj}.Transpose", [y], perm=perm)
        q = b.node("Mul", f"{a}.q.Scale", [heads["q"], c.scale])
        scores = b.node("MatMul", f"{a}.scores.MatMul", [q, heads["k"]])
        scores = b.node("Add", f"{a}.scores.AddMask", [scores, mask_bias])
        weights = b.node("Softmax", f"{a}.Softmax", [scores], axis=-1)
        context = b.node("MatMul", f"{a}.context.MatMul", [weights, heads["v"]])
        context = b.node("Transpose", f"{a}.context.Transpose", [context], perm=[0, 2, 1, 3])
        context = b.node("Reshape", f"{a}.context.Reshape", [context, c.merge_shape])
        y = b.linear(f"{a}.out", context, d, d)
        y = b.node("Add", f"{a}.Residual", [y, x])
        x = b.layer_norm(f"{p}.sa_layer_norm", y, d)

        f = f"{p}.ffn"
        y = b.linear(f"{f}.lin1", x, d, cfg.hidden_dim)
        g = b.gelu(f"{f}.gelu", y, c)
        y = b.linear(f"{f}.lin2", g, cfg.hidden_dim, d)
        y = b.node("Add", f"{f}.Residual", [y, x])
        x = b.layer_norm(f"{p}.output_layer_norm", y, d)

    # Classification head on the first token.
    x = b.node("Gather", "head.first_token.Gather", [x, c.zero_i], axis=1)
    x = b.linear("head.pre_classifier", x, d, d)
    x = b.node("Relu", "head.pre_classifier.Relu", [x])
    x = b.linear("head.classifier", x, d, num_labels)
    b.nodes.append(helper.make_node("Identity", [x], ["logits"], name="head.logits.Identity"))

    graph = helper.make_graph(
        b.nodes,
        "distilbert",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        outputs=[helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_labels])],
    )
    doc = f"DistilBERT for sequence classification with random weights (seed {seed}): {cfg}"
    return _assemble(b, graph, doc, {"crowdgraph.zoo.size": str(size), "crowdgraph.zoo.seed": str(seed)})


@dataclass(frozen=True)
class DecoderSize:
    """The dimensions of a GPT-2-shaped decoder (names as in ``GPT2Config``)."""

    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}; "
                "pick a head count that divides the hidden size"
            )


#: The named decoder sizes. ``full`` is ``GPT2Config()`` (124M parameters
#: with an untied head); ``small`` (about 7M) is what the demo and the
#: tests cut into several partitions; ``tiny`` builds in milliseconds.
DECODER_SIZES: dict[str, DecoderSize] = {
    "full": DecoderSize(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "small": DecoderSize(vocab_size=8000, n_embd=256, n_layer=4, n_head=4, n_positions=512),
    "tiny": DecoderSize(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=128),
}


def _decoder_size(size: str | DecoderSize) -> DecoderSize:
    if isinstance(size, DecoderSize):
        return size
    try:
        return DECODER_SIZES[size]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown decoder size {size!r}; use one of {sorted(DECODER_SIZES)} or a DecoderSize"
        ) from None


def gpt2(size: str | DecoderSize = "small", *, seed: int = 0, use_cache: bool = True) -> onnx.ModelProto:
    """Build a GPT-2-shaped decoder with a key/value cache and random weights.

    The graph has the layout Hugging Face Optimum exports for
    ``text-generation-with-past``, so everything that works on it works on
    such exports too:

    * inputs ``input_ids`` and ``position_ids`` (int64, ``[batch,
      sequence]``), ``attention_mask`` (int64, ``[batch, past_sequence +
      sequence]``) and, per layer ``i``, ``past_key_values.{i}.key`` /
      ``.value`` (float32, ``[batch, n_head, past_sequence, head_dim]``);
    * outputs ``logits`` (float32, ``[batch, sequence, vocab]``) and
      ``present.{i}.key`` / ``.value`` (the past with this step's keys and
      values appended along axis 2).

    Attention is causal and masked by ``attention_mask`` (left padding
    works); positions are learned; the MLP uses the exact (erf) GELU and
    the language-model head has its own weights (GPT-2 ties them to the
    token embedding).  Weights are drawn from
    ``numpy.random.default_rng(seed)``.

    >>> m = gpt2("tiny")
    >>> [i.name for i in m.graph.input][:4]
    ['input_ids', 'attention_mask', 'position_ids', 'past_key_values.0.key']
    >>> [o.name for o in m.graph.output][:3]
    ['logits', 'present.0.key', 'present.0.value']
    """
    cfg = _decoder_size(size)
    b = _Builder(np.random.default_rng(seed))
    d, h = cfg.n_embd, cfg.n_head
    head_dim = d // h

    c = b.constants(d, h)
    zero_f = b.init("const.zero_float", np.array(0.0, np.float32))
    axes_1 = b.init("const.axes_1", np.array([1], np.int64))

    wte = b.normal("transformer.wte.weight", (cfg.vocab_size, d))
    wpe = b.normal("transformer.wpe.weight", (cfg.n_positions, d))
    words = b.node("Gather", "transformer.wte.Gather", [wte, "input_ids"], axis=0)
    places = b.node("Gather", "transformer.wpe.Gather", [wpe, "position_ids"], axis=0)
    x = b.node("Add", "transformer.embeddings.Add", [words, places])

    # Additive attention bias [batch, 1, sequence, total]: query i (absolute
    # position past + i) sees key j when j <= past + i and the mask keeps j.
    total = b.node("Gather", "attention_bias.total.Gather", [b.node("Shape", "attention_bias.total.Shape",
                                                                    ["attention_mask"]), c.one_i], axis=0)
    sequence = b.node("Gather", "attention_bias.sequence.Gather", [b.node("Shape", "attention_bias.sequence.Shape",
                                                                          ["input_ids"]), c.one_i], axis=0)
    past = b.node("Sub", "attention_bias.past.Sub", [total, sequence])
    rows = b.node("Range", "attention_bias.rows.Range", [past, total, c.one_i])
    rows = b.node("Unsqueeze", "attention_bias.rows.Unsqueeze", [rows, axes_1])
    cols = b.node("Range", "attention_bias.cols.Range", [c.zero_i, total, c.one_i])
    causal = b.node("LessOrEqual", "attention_bias.causal.LessOrEqual", [cols, rows])
    kept = b.node("Cast", "attention_bias.kept.Cast", ["attention_mask"], to=TensorProto.BOOL)
    kept = b.node("Unsqueeze", "attention_bias.kept.Unsqueeze", [kept, c.axes_12])
    seen = b.node("And", "attention_bias.And", [causal, kept])
    bias = b.node("Where", "attention_bias.Where", [seen, zero_f, c.mask_min])

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        a = f"{p}.attn"
        y = b.layer_norm(f"{p}.ln_1", x, d)
        heads = {}
        for proj in ("q", "k", "v"):
            z = b.linear(f"{a}.{proj}", y, d, d)
            z = b.node("Reshape", f"{a}.{proj}.Reshape", [z, c.heads_shape])
            heads[proj] = b.node("Transpose", f"{a}.{proj}.Transpose", [z], perm=[0, 2, 1, 3])
        keys, values = heads["k"], heads["v"]
        if use_cache:
            keys = b.node("Concat", f"present.{i}.key", [f"past_key_values.{i}.key", keys], axis=2)
            values = b.node("Concat", f"present.{i}.value", [f"past_key_values.{i}.value", values], axis=2)
        q = b.node("Mul", f"{a}.q.Scale", [heads["q"], c.scale])
        kt = b.node("Transpose", f"{a}.k.TransposeForScores", [keys], perm=[0, 1, 3, 2])
        scores = b.node("MatMul", f"{a}.scores.MatMul", [q, kt])
        scores = b.node("Add", f"{a}.scores.AddBias", [scores, bias])
        weights = b.node("Softmax", f"{a}.Softmax", [scores], axis=-1)
        context = b.node("MatMul", f"{a}.context.MatMul", [weights, values])
        context = b.node("Transpose", f"{a}.context.Transpose", [context], perm=[0, 2, 1, 3])
        context = b.node("Reshape", f"{a}.context.Reshape", [context, c.merge_shape])
        z = b.linear(f"{a}.c_proj", context, d, d)
        x = b.node("Add", f"{a}.Residual", [z, x])

        m = f"{p}.mlp"
        y = b.layer_norm(f"{p}.ln_2", x, d)
        y = b.linear(f"{m}.c_fc", y, d, 4 * d)
        g = b.gelu(f"{m}.gelu", y, c)
        z = b.linear(f"{m}.c_proj", g, 4 * d, d)
        x = b.node("Add", f"{m}.Residual", [z, x])

    x = b.layer_norm("transformer.ln_f", x, d)
    head = b.normal("lm_head.weight", (d, cfg.vocab_size))
    b.nodes.append(helper.make_node("MatMul", [x, head], ["logits"], name="lm_head.MatMul"))

    cache = ["batch", h, "past_sequence", head_dim]
    grown = ["batch", h, "past_sequence + sequence", head_dim]
    caches = [f"{i}.{kind}" for i in range(cfg.n_layer) for kind in ("key", "value")] if use_cache else []
    graph = helper.make_graph(
        b.nodes,
        "gpt2",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                          ["batch", "past_sequence + sequence" if use_cache else "sequence"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
            *(helper.make_tensor_value_info(f"past_key_values.{c}", TensorProto.FLOAT, cache) for c in caches),
        ],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", cfg.vocab_size]),
            *(helper.make_tensor_value_info(f"present.{c}", TensorProto.FLOAT, grown) for c in caches),
        ],
    )
    doc = f"GPT-2-shaped decoder with a key/value cache and random weights (seed {seed}): {cfg}"
    return _assemble(b, graph, doc, {"crowdgraph.zoo.size": str(size), "crowdgraph.zoo.seed": str(seed)})


def _assemble(b: _Builder, graph: onnx.GraphProto, doc: str, props: dict[str, str]) -> onnx.ModelProto:
    """The model around ``graph``, at :data:`OPSET` and :data:`IR_VERSION`, with ``b``'s weights."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="crowdgraph.zoo", doc_string=doc)
    model.ir_version = IR_VERSION
    # Add the weights in place: make_graph and make_model would copy them twice.
    for name, array in b.initializers:
        tensor = model.graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.raw_data = array.tobytes()
    helper.set_model_props(model, props)
    return model


def unet(*, seed: int = 0, width: int = 8, classes: int = 2) -> onnx.ModelProto:
    """Build a small U-Net for image segmentation with random weights.

    Two levels down and up: at each level two 3x3 convolutions with
    BatchNormalization and Relu, a 2x2 MaxPool down, a 2x2 stride-2
    ConvTranspose up, and the skip connection joined by a channel
    ``Concat``; a 1x1 convolution gives ``classes`` scores per pixel.
    ``width`` channels at full resolution, twice as many a level down.

    Its weights are tiny (about 0.1 MB) but at 1x3x512x512 its full-resolution
    activations are 8.4 MB a tensor (16.8 MB after the last ``Concat``):
    the model whose floor only spatial tiles (:mod:`crowdgraph.tile`) can
    bring down.  The input ``image`` is ``[batch, 3, height, width]``
    (height and width multiples of 4); the output ``scores`` is ``[batch,
    classes, height, width]``.

    >>> model = unet()
    >>> [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    (['image'], ['scores'])
    >>> sorted({n.op_type for n in model.graph.node})[:4]
    ['BatchNormalization', 'Concat', 'Conv', 'ConvTranspose']
    """
    b = _Builder(np.random.default_rng(seed))

    def conv(prefix: str, x: str, n_in: int, n_out: int, kernel: int = 3) -> str:
        w = b.normal(f"{prefix}.weight", (n_out, n_in, kernel, kernel), std=math.sqrt(2.0 / (n_in * kernel ** 2)))
        bias = b.near(f"{prefix}.bias", (n_out,), 0.0)
        pad = kernel // 2
        return b.node("Conv", f"{prefix}.Conv", [x, w, bias], kernel_shape=[kernel, kernel], pads=[pad] * 4)

    def block(prefix: str, x: str, n_in: int, n_out: int) -> str:
        for k in range(2):
            x = conv(f"{prefix}.conv{k}", x, n_in if k == 0 else n_out, n_out)
            stats = [b.near(f"{prefix}.bn{k}.{p}", (n_out,), c)
                     for p, c in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0))]
            x = b.node("BatchNormalization", f"{prefix}.bn{k}.BatchNormalization", [x, *stats])
            x = b.node("Relu", f"{prefix}.conv{k}.Relu", [x])
        return x

    def up(prefix: str, x: str, n_in: int, n_out: int) -> str:
        w = b.normal(f"{prefix}.weight", (n_in, n_out, 2, 2), std=math.sqrt(1.0 / n_in))
        return b.node("ConvTranspose", f"{prefix}.ConvTranspose", [x, w], kernel_shape=[2, 2], strides=[2, 2])

    def pool(prefix: str, x: str) -> str:
        return b.node("MaxPool", f"{prefix}.MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])

    skip1 = block("down1", "image", 3, width)
    skip2 = block("down2", pool("down1", skip1), width, 2 * width)
    x = block("bottom", pool("down2", skip2), 2 * width, 4 * width)
    x = b.node("Concat", "up2.Concat", [up("up2", x, 4 * width, 2 * width), skip2], axis=1)
    x = block("up2", x, 4 * width, 2 * width)
    x = b.node("Concat", "up1.Concat", [up("up1", x, 2 * width, width), skip1], axis=1)
    x = block("up1", x, 2 * width, width)
    x = conv("head", x, width, classes, kernel=1)
    b.nodes.append(helper.make_node("Identity", [x], ["scores"], name="head.scores.Identity"))
    graph = helper.make_graph(
        b.nodes, "unet",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        outputs=[helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                               ["batch", classes, "height", "width"])],
    )
    doc = f"U-Net for segmentation with random weights (seed {seed}, width {width}, classes {classes})"
    return _assemble(b, graph, doc, {"crowdgraph.zoo.size": f"unet{width}", "crowdgraph.zoo.seed": str(seed)})


def image_inputs(batch: int = 1, height: int = 512, width: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded standard-normal ``image`` batch for :func:`unet`.

    >>> image_inputs(2, 8, 4)["image"].shape
    (2, 3, 8, 4)
    """
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((batch, 3, height, width)).astype(np.float32)}


def parameter_count(model: onnx.ModelProto) -> int:
    """Number of float parameters in ``model``'s initializers.

    Scalars and shape vectors of other dtypes are not counted.

    >>> parameter_count(distilbert("tiny")) > 100_000
    True
    """
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    return sum(
        math.prod(t.dims)
        for t in model.graph.initializer
        if t.data_type in floats and len(t.dims) > 0
    )


def _vocab_and_positions(model_or_size: onnx.ModelProto | str | DistilBertSize) -> tuple[int, int | None]:
    if not isinstance(model_or_size, onnx.ModelProto):
        cfg = _size(model_or_size)
        return cfg.vocab_size, cfg.max_position_embeddings
    vocab = positions = None
    for t in model_or_size.graph.initializer:
        if len(t.dims) != 2:
            continue
        if vocab is None and "word_embeddings" in t.name:
            vocab = int(t.dims[0])
        elif positions is None and "position_embeddings" in t.name:
            positions = int(t.dims[0])
    if vocab is None:
        raise ValueError(
            "cannot find the vocabulary size of this model: it has no 2-D initializer "
            "named like '*word_embeddings*'; pass the size ('full', 'tiny') instead"
        )
    return vocab, positions


def sample_inputs(
    model_or_size: onnx.ModelProto | str | DistilBertSize = "full",
    batch: int = 1,
    sequence: int = 128,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Return valid ``input_ids`` and ``attention_mask`` for a DistilBERT.

    Token ids are uniform in ``[1, vocab)``.  Row 0 is never padded; for
    ``batch > 1`` the later rows are padded at the end (mask 0, token id 0),
    the last row to about half the sequence, so the mask matters.
    ``model_or_size`` is a size name or a model whose word embedding table
    gives the vocabulary (built here or exported from transformers).

    >>> feeds = sample_inputs("tiny", batch=3, sequence=6, seed=1)
    >>> feeds["input_ids"].shape, feeds["input_ids"].dtype
    ((3, 6), dtype('int64'))
    >>> feeds["attention_mask"].sum(axis=1).tolist()
    [6, 5, 4]
    """
    if batch < 1 or sequence < 1:
        raise ValueError(f"batch and sequence must be at least 1, got {batch} and {sequence}")
    vocab, positions = _vocab_and_positions(model_or_size)
    if positions is not None and sequence > positions:
        raise ValueError(
            f"sequence {sequence} is longer than the model's {positions} positions; "
            "use a shorter sequence or a larger model size"
        )
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, sequence), dtype=np.int64)
    mask = np.ones((batch, sequence), dtype=np.int64)
    for row in range(1, batch):
        length = max(1, sequence - (row * sequence) // (2 * batch))
        mask[row, length:] = 0
        ids[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}
