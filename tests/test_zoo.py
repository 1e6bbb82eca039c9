"""The models the project builds and tests with: crowdgraph.zoo and tests/models.py."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdgraph import zoo
from tests import models

SHAPES = [(1, 128), (8, 128), (2, 7)]


def session(model: onnx.ModelProto | os.PathLike | str) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run(model, feeds) -> list[np.ndarray]:
    return session(model).run(None, feeds)


@pytest.fixture(scope="module")
def tiny() -> onnx.ModelProto:
    return zoo.distilbert("tiny")


@pytest.fixture(scope="module")
def tiny_session(tiny) -> ort.InferenceSession:
    return session(tiny)


def logits(sess: ort.InferenceSession, feeds) -> np.ndarray:
    return sess.run(["logits"], feeds)[0]


# ------------------------------------------------------------------- zoo


def test_tiny_is_valid_onnx(tiny):
    onnx.checker.check_model(tiny, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(tiny, check_type=True, strict_mode=True)
    assert inferred.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert tiny.ir_version == 8
    assert [(o.domain, o.version) for o in tiny.opset_import] == [("", 17)]
    for value in tiny.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]


def test_tiny_names_are_unique_and_meaningful(tiny):
    node_names = [n.name for n in tiny.graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    outputs = [o for n in tiny.graph.node for o in n.output]
    assert len(set(outputs)) == len(outputs)
    init_names = [t.name for t in tiny.graph.initializer]
    assert len(set(init_names)) == len(init_names)
    assert "layer.1.attention.q.MatMul" in node_names
    assert "layer.0.ffn.lin1.weight" in init_names
    ops = {n.op_type for n in tiny.graph.node}
    assert {"LayerNormalization", "Softmax", "Erf", "Range", "Shape"} <= ops
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in tiny.graph.initializer if len(t.dims) == 2)


@pytest.mark.parametrize("batch,sequence", SHAPES)
def test_tiny_runs(tiny_session, batch, sequence):
    out = logits(tiny_session, zoo.sample_inputs("tiny", batch, sequence))
    assert out.shape == (batch, 2) and out.dtype == np.float32
    assert np.isfinite(out).all()


@pytest.mark.slow  # the tiny DistilBERT tests above check the same builder fast
def test_full_size_builds_fast_counts_and_runs():
    import time

    start = time.perf_counter()
    model = zoo.distilbert("full")
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"building the full model took {elapsed:.1f} s"
    assert 66_000_000 <= zoo.parameter_count(model) <= 68_000_000  # 66,955,010 as in transformers
    onnx.checker.check_model(model, full_check=True)
    sess = session(model)
    for batch, sequence in SHAPES:
        out = logits(sess, zoo.sample_inputs("full", batch, sequence))
        assert out.shape == (batch, 2) and np.isfinite(out).all()


def test_deterministic_for_a_seed(tiny):
    assert zoo.distilbert("tiny").SerializeToString() == tiny.SerializeToString()
    assert zoo.distilbert("tiny", seed=1).SerializeToString() != tiny.SerializeToString()
    a = zoo.sample_inputs("tiny", 4, 32, seed=3)
    b = zoo.sample_inputs("tiny", 4, 32, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_num_labels():
    model = zoo.distilbert("tiny", num_labels=5)
    out = run(model, zoo.sample_inputs("tiny", 3, 9))[0]
    assert out.shape == (3, 5)


def test_unknown_size_is_an_error():
    with pytest.raises(ValueError, match="unknown DistilBERT size"):
        zoo.distilbert("huge")
    with pytest.raises(ValueError, match="n_heads"):
        zoo.DistilBertSize(100, 10, 1, 3, 20, 16)


def test_custom_size():
    size = zoo.DistilBertSize(vocab_size=50, dim=24, n_layers=1, n_heads=3, hidden_dim=48, max_position_embeddings=16)
    model = zoo.distilbert(size)
    out = run(model, zoo.sample_inputs(size, 2, 16))[0]
    assert out.shape == (2, 2) and np.isfinite(out).all()


def test_logits_depend_on_the_input(tiny_session):
    a = zoo.sample_inputs("tiny", 2, 16, seed=0)
    b = zoo.sample_inputs("tiny", 2, 16, seed=1)
    la, lb = logits(tiny_session, a), logits(tiny_session, b)
    assert np.abs(la - lb).max() > 1e-4
    # A later token changes the first token's logits, through attention.
    c = {k: v.copy() for k, v in a.items()}
    c["input_ids"][0, 5] = (c["input_ids"][0, 5] + 1) % 1000
    assert np.abs(logits(tiny_session, c)[0] - la[0]).max() > 1e-6
    assert np.allclose(logits(tiny_session, c)[1], la[1], atol=1e-6)  # rows are independent


def test_padding_changes_only_where_masked(tiny_session):
    feeds = zoo.sample_inputs("tiny", 3, 20, seed=2)
    mask = feeds["attention_mask"]
    assert mask[0].all() and not mask[2].all()
    base = logits(tiny_session, feeds)

    # Token ids under the mask are ignored.
    changed = {k: v.copy() for k, v in feeds.items()}
    changed["input_ids"][mask == 0] = 7
    assert np.allclose(logits(tiny_session, changed), base, atol=1e-6)

    # A padded row gives the logits of its unpadded prefix alone.
    for row in (1, 2):
        n = int(mask[row].sum())
        alone = {k: v[row : row + 1, :n] for k, v in feeds.items()}
        assert np.allclose(logits(tiny_session, alone)[0], base[row], atol=1e-5)

    # Masking more of a row changes its logits, and only its logits.
    masked = {k: v.copy() for k, v in feeds.items()}
    masked["attention_mask"][0, 10:] = 0
    out = logits(tiny_session, masked)
    assert np.abs(out[0] - base[0]).max() > 1e-6
    assert np.allclose(out[1:], base[1:], atol=1e-6)


def test_sample_inputs():
    feeds = zoo.sample_inputs("full", batch=4, sequence=128, seed=5)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (4, 128)
    assert ids.min() >= 0 and ids.max() < 30522
    assert mask[0].all() and set(np.unique(mask)) == {0, 1}
    lengths = mask.sum(axis=1)
    assert list(lengths) == sorted(lengths, reverse=True) and lengths[-1] >= 64
    for row, n in enumerate(lengths):  # padding is trailing
        assert mask[row, :n].all() and not mask[row, n:].any()
    assert zoo.sample_inputs("tiny", 1, 128)["input_ids"].max() < 1000
    with pytest.raises(ValueError, match="positions"):
        zoo.sample_inputs("tiny", 1, 129)


def test_sample_inputs_from_a_model(tiny):
    feeds = zoo.sample_inputs(tiny, 2, 12)
    assert feeds["input_ids"].max() < 1000
    with pytest.raises(ValueError, match="vocabulary"):
        zoo.sample_inputs(models.chain()[0])


# ----------------------------------------------------------- small graphs


@pytest.mark.parametrize("name", sorted(models.SMALL_MODELS))
def test_small_model_is_valid_and_runs(name):
    build = models.SMALL_MODELS[name]
    model, feeds = build()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    outputs = run(model, feeds)
    assert outputs and all(np.isfinite(o).all() for o in outputs)
    assert all(o.std() > 0 for o in outputs)
    again, again_feeds = build()
    assert again.SerializeToString() == model.SerializeToString()
    assert all(np.array_equal(feeds[k], again_feeds[k]) for k in feeds)
    assert build(seed=1)[0].SerializeToString() != model.SerializeToString()


@pytest.mark.parametrize("name", sorted(models.SMALL_MODELS))
def test_small_model_runs_at_another_batch(name):
    model, feeds = models.SMALL_MODELS[name](batch=7)
    assert all(v.shape[0] == 7 for v in feeds.values())
    assert all(o.shape[0] == 7 for o in run(model, feeds))


def test_chain_weights_are_sizable():
    model, _ = models.chain()
    big = [t for t in model.graph.initializer if list(t.dims) == [256, 256]]
    assert len(big) == 4


def test_multi_io_outputs():
    model, feeds = models.multi_io()
    assert [i.name for i in model.graph.input] == ["a", "b", "c"]
    assert [o.name for o in model.graph.output] == ["late", "early", "mid"]
    late, early, _ = run(model, feeds)
    consumers = [n for n in model.graph.node if "early" in n.input]
    assert consumers, "the early output is also read further on"
    assert late.shape == (4, 32) and early.shape == (4, 64)


def test_shared_initializer_is_read_by_two_distant_nodes():
    model, _ = models.shared_initializer()
    readers = [i for i, n in enumerate(model.graph.node) if "tied.weight" in n.input]
    assert len(readers) == 2 and readers[1] - readers[0] > 5


def test_if_model_uses_outer_scope_and_both_branches_work():
    model, feeds = models.if_model()
    if_node = next(n for n in model.graph.node if n.op_type == "If")
    then_inputs = {x for n in if_node.attribute[0].g.node for x in n.input} | {
        x for a in if_node.attribute for n in a.g.node for x in n.input
    }
    init_names = {t.name for t in model.graph.initializer}
    computed = {o for n in model.graph.node for o in n.output}
    assert then_inputs & init_names and then_inputs & computed
    other, other_feeds = models.if_model(take_then=False)
    onnx.checker.check_model(other, full_check=True)
    assert not np.allclose(run(model, feeds)[0], run(other, other_feeds)[0])


def test_loop_model_uses_outer_scope_and_trip_count():
    model, feeds = models.loop_model()
    loop = next(n for n in model.graph.node if n.op_type == "Loop")
    body_inputs = {x for n in loop.attribute[0].g.node for x in n.input}
    assert "loop.weight" in body_inputs and "pre.tanh" in body_inputs
    y3 = run(model, feeds)[0]
    y4 = run(models.loop_model(trip_count=4)[0], feeds)[0]
    assert not np.allclose(y3, y4)


def test_constant_subgraphs_has_the_constant_patterns():
    model, _ = models.constant_subgraphs()
    ops = [n.op_type for n in model.graph.node]
    for op in ("Constant", "ConstantOfShape", "Identity", "Shape", "Gather", "Concat", "Reshape"):
        assert op in ops


# ------------------------------------------------------------- light CNNs


def _light_params():
    return [
        name if name in models.QUICK_LIGHT_CNNS else pytest.param(name, marks=pytest.mark.slow)
        for name in models.LIGHT_CNNS
    ]


@pytest.mark.parametrize("name", _light_params())
def test_light_cnn(name):
    model, feeds = models.light_cnn(name)
    onnx.checker.check_model(model, full_check=True)
    assert "ConstantOfShape" not in {n.op_type for n in model.graph.node}
    init_names = {t.name for t in model.graph.initializer}
    assert not init_names & {i.name for i in model.graph.input}
    assert list(feeds) == [model.graph.input[0].name]
    assert feeds[model.graph.input[0].name].shape == (1, 3, 224, 224)
    (out,) = run(model, feeds)
    assert np.isfinite(out).all()
    assert out.std() > 1e-3 * np.abs(out).max()  # not all equal
    if name not in models.SLOW_LIGHT_CNNS:
        again, _ = models.light_cnn(name)
        assert again.SerializeToString() == model.SerializeToString()


def test_light_cnn_legacy_inputs():
    model, feeds = models.light_cnn("squeezenet", legacy_inputs=True)
    onnx.checker.check_model(model)
    assert model.ir_version == 3
    assert {t.name for t in model.graph.initializer} <= {i.name for i in model.graph.input}
    new, _ = models.light_cnn("squeezenet")
    assert np.allclose(run(model, feeds)[0], run(new, feeds)[0])


def test_light_cnn_unknown():
    with pytest.raises(ValueError, match="unknown light model"):
        models.light_cnn("mobilenet")


# ------------------------------------------------------------ random DAGs


def check_random_dag(seed: int, n_nodes: int, **kwargs) -> None:
    model, feeds = models.random_dag(seed, n_nodes, **kwargs)
    onnx.checker.check_model(model, full_check=True)
    read = {x for n in model.graph.node for x in n.input}
    assert all(i.name in read for i in model.graph.input)
    outputs = run(model, feeds)
    assert len(outputs) == len(model.graph.output) >= 1
    for o in outputs:
        assert np.isfinite(o).all() and np.abs(o).max() <= 1.0
    assert models.random_dag(seed, n_nodes, **kwargs)[0].SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("seed", range(10))
def test_random_dag(seed):
    check_random_dag(seed, n_nodes=5 + 3 * seed, n_inputs=1 + seed % 3)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_nodes=st.integers(1, 40),
    n_inputs=st.integers(1, 4),
    extra_outputs=st.integers(0, 3),
)
def test_random_dag_hypothesis(seed, n_nodes, n_inputs, extra_outputs):
    check_random_dag(seed, n_nodes, n_inputs=n_inputs, extra_outputs=extra_outputs)


# ---------------------------------------------------- exported DistilBERT


def check_exported(size: str) -> None:
    import torch

    path = models.exported_distilbert(size)
    assert path.exists() and path.name == "model.onnx"
    model = onnx.load(str(path))  # loads external data, if the exporter wrote any
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    sess = session(path)
    torch_model = models.distilbert_torch_model(size)
    for batch, sequence in SHAPES:
        feeds = models.exported_distilbert_inputs(batch, sequence, size=size)
        out = logits(sess, feeds)
        assert out.shape == (batch, 2) and np.isfinite(out).all()
        with torch.no_grad():
            expected = torch_model(
                torch.from_numpy(feeds["input_ids"]),
                attention_mask=torch.from_numpy(feeds["attention_mask"]),
            ).logits.numpy()
        np.testing.assert_allclose(out, expected, atol=1e-4)
    assert models.exported_distilbert(size) == path  # cached


def test_exported_distilbert_reduced():
    check_exported("reduced")


@pytest.mark.slow
def test_exported_distilbert_full():
    check_exported("full")
    model = onnx.load(str(models.exported_distilbert("full")), load_external_data=False)
    assert 66_000_000 <= zoo.parameter_count(model) <= 68_000_000 or any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    )


def test_export_cache_survives_a_lost_race(tmp_path, monkeypatch):
    """Another process finishing first leaves its file in place and ours goes."""
    import torch
    import transformers

    key = f"distilbert-reduced-torch{torch.__version__}-transformers{transformers.__version__}"
    key = "".join(c if c.isalnum() or c in "-._" else "_" for c in key)
    winner = tmp_path / key
    tiny, _ = models.chain(n_layers=1, width=4)

    def fake_export(size, path):
        onnx.save(tiny, str(path))
        winner.mkdir()
        onnx.save(tiny, str(winner / "model.onnx"))
        (winner / "marker").write_text("first")
        return "fake"

    monkeypatch.setattr(models, "_export", fake_export)
    path = models.exported_distilbert("reduced", cache_dir=tmp_path)
    assert path == winner / "model.onnx"
    assert (winner / "marker").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == [key]  # no temporary left


# ------------------------------------------------------------------- U-Net


def test_unet_is_valid_deterministic_and_runs_at_any_multiple_of_four():
    model = zoo.unet()
    onnx.checker.check_model(model, full_check=True)
    assert model.SerializeToString() == zoo.unet().SerializeToString()
    assert zoo.unet(seed=1).SerializeToString() != model.SerializeToString()
    assert zoo.parameter_count(model) < 50_000
    sess = session(model)
    for batch, height, width in [(1, 64, 64), (2, 32, 48)]:
        feeds = zoo.image_inputs(batch, height, width)
        (scores,) = sess.run(None, feeds)
        assert scores.shape == (batch, 2, height, width) and np.isfinite(scores).all()
        assert scores.std() > 0.1, "the scores vary from pixel to pixel"
    a, b = zoo.image_inputs(1, 32, 32, seed=0), zoo.image_inputs(1, 32, 32, seed=1)
    assert not np.allclose(sess.run(None, a)[0], sess.run(None, b)[0])
