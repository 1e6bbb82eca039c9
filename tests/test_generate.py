"""Generation: decoder layout, sampling, the loop, and tokens equal to the whole model's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crowdgraph
from crowdgraph import ThreadExecutor, zoo
from crowdgraph.errors import BudgetError, InputError, ModelError
from crowdgraph.generate import (
    Sampling,
    decode,
    decoder_layout,
    feed_cache_shapes,
    generation_shapes,
    left_padded,
    pick_tokens,
)
from crowdgraph.runtime import open_session, run_session
from crowdgraph.split import smallest_budget
from crowdgraph.state import StateBook

from .models import OPTIMUM_DECODERS, optimum_decoder, whole_model_tokens
from .oracle import TOLERANCE

MAX_LENGTH = 24
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


@pytest.fixture(scope="module")
def model():
    return zoo.gpt2("tiny")


@pytest.fixture(scope="module")
def session(model):
    return open_session(model.SerializeToString())


def greedy_one_by_one(session, model, prompt: list[int], new_tokens: int) -> list[int]:
    """The oracle: one sequence at a time through the whole model, present fed back as past."""
    pasts = [i.name for i in model.graph.input if i.name.startswith("past_key_values.")]
    heads, head_dim = (model.graph.input[3].type.tensor_type.shape.dim[k].dim_value for k in (1, 3))
    feeds = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64),
             "position_ids": np.arange(len(prompt))[None],
             **{name: np.zeros((1, heads, 0, head_dim), np.float32) for name in pasts}}
    tokens = []
    for _ in range(new_tokens):
        out = run_session(session, feeds)
        token = int(out["logits"][0, -1].argmax())
        tokens.append(token)
        length = feeds["attention_mask"].shape[1] + 1
        feeds = {"input_ids": np.array([[token]]), "attention_mask": np.ones((1, length), np.int64),
                 "position_ids": np.array([[length - 1]]),
                 **{name: out[name.replace("past_key_values", "present")] for name in pasts}}
    return tokens


def whole_model_steps(session, compiled, prompts, new_tokens, **kwargs):
    """The same loop as generate() with one whole-model session as the step."""
    layout = compiled.decoder_layout
    dims = {t.name: (t.dims[1], t.dims[3]) for t in compiled.inputs if t.name.startswith("past_key_values.")}
    ids, mask = left_padded(prompts)
    return list(decode(lambda feeds: run_session(session, feeds), layout, dims, ids, mask,
                       max_new_tokens=new_tokens, **kwargs))


def smallest_generation_budget(model) -> int:
    layout = decoder_layout([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    declared = {i.name: tuple(d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim)
                for i in model.graph.input}
    return smallest_budget(model, generation_shapes(layout, declared, MAX_LENGTH))


@pytest.mark.parametrize("budget", ["two partitions", "smallest"])
def test_greedy_tokens_equal_the_whole_model_one_sequence_at_a_time(model, session, budget):
    if budget == "smallest":
        compiled = crowdgraph.compile(model, smallest_generation_budget(model), max_length=MAX_LENGTH)
    else:
        compiled = crowdgraph.compile(model, partitions=2, max_length=MAX_LENGTH)
    assert len(compiled.partitions) >= 2
    out = compiled.generate(PROMPTS, max_new_tokens=8, executor="threads")
    assert out.shape == (3, 5 + 8)
    for row, prompt in enumerate(PROMPTS):
        assert out[row, -8:].tolist() == greedy_one_by_one(session, model, prompt, 8)
        assert out[row, 5 - len(prompt):5].tolist() == prompt
    report = compiled.last_report
    assert report.tokens == 3 * 8 and report.steps == 8 and len(report.runs) == 8
    assert sum(int(t["tasks"]) for t in report.worker_totals().values()) == 8 * 3 * len(compiled.partitions)


def test_streamed_steps_and_logits_equal_the_whole_model_loop_when_sampling(model, session):
    compiled = crowdgraph.compile(model, partitions=3, max_length=MAX_LENGTH)
    sampling = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    steps = list(compiled.generate(PROMPTS, max_new_tokens=6, stream=True, **sampling))
    want = whole_model_steps(session, compiled, PROMPTS, 6, sampling=Sampling(True, 0.8, 50, 0.9), seed=3)
    assert [s.tokens.tolist() for s in steps] == [w.tokens.tolist() for w in want]
    for got, expected in zip(steps, want):
        assert float(np.nanmax(np.abs(got.logits - expected.logits))) <= TOLERANCE
    again = compiled.generate(PROMPTS, max_new_tokens=6, **sampling)
    assert again[:, -6:].tolist() == np.stack([s.tokens for s in steps], axis=1).tolist()


def test_a_sequence_that_meets_its_stop_id_leaves_and_the_others_go_on(model, session):
    compiled = crowdgraph.compile(model, partitions=2, max_length=MAX_LENGTH)
    free = [greedy_one_by_one(session, model, prompt, 6) for prompt in PROMPTS]
    stop = free[1][2]  # sequence 1 ends at its third token
    steps = list(compiled.generate(PROMPTS, max_new_tokens=6, eos_token_id=[stop], pad_token_id=-1, stream=True))
    for row, tokens in enumerate(free):
        got = [int(s.tokens[row]) for s in steps]
        end = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        assert got[:end] == tokens[:end]
        assert got[end:] == [-1] * (len(tokens) - end)
    assert steps[2].finished[1] and not steps[1].finished[1]
    assert np.isnan(steps[3].logits[1]).all()
    assert steps[-1].finished.all()
    # Each step runs only the sequences that had not ended before it.
    running = [3] + [int((~s.finished).sum()) for s in steps[:-1]]
    assert [run.microbatches for run in compiled.last_report.runs] == running
    assert running[3] < 3


def test_caches_stay_on_the_workers_that_run_their_layers(model, session):
    """A worker per partition with room: every cache stays where its layers
    run and no step sends one; a smaller crowd swaps partitions, so the
    caches travel with the steps."""
    compiled = crowdgraph.compile(model, partitions=3, max_length=MAX_LENGTH)
    largest = max(p.resident_bytes for p in compiled.partitions)
    with_state = [p.name for p in compiled.partitions if any(n.startswith("past_key_values.") for n in p.inputs)]
    sent, kept = {}, {}
    for crowd, workers in (("a worker each", 4), ("too few", 2)):
        with ThreadExecutor(workers=workers, memory=2 * largest) as executor:
            out = compiled.generate(PROMPTS, max_new_tokens=6, executor=executor)
        for row, prompt in enumerate(PROMPTS):
            assert out[row, -6:].tolist() == greedy_one_by_one(session, model, prompt, 6), crowd
        report = compiled.last_report
        assert not report.rebuilt
        sent[crowd] = sum(t.bytes_in for run in report.runs[1:] for t in run.tasks if t.partition in with_state)
        kept[crowd] = sorted(n for n in report.kept.values() if n)
    assert kept["a worker each"] == [3] * len(with_state)
    assert kept["too few"] == []
    assert sent["a worker each"] < sent["too few"] / 2


def test_a_worker_keeps_as_many_caches_as_its_budget_has_room_for():
    book = StateBook({"p1": (("present.0.key", "past_key_values.0.key"),)}, {"p1": 1000})
    for key in ("a", "b", "c"):
        book.add_sequence(key, {"past_key_values.0.key": np.zeros((1, 2, 0, 4), np.float32)})
    book.begin(["a", "b", "c"])
    assert book.keep("p1", "a", "w1", memory=5000, resident_bytes=4000)  # its own cache is in the estimate
    book.finished("p1", "a", "w1", {}, kept=True)
    assert book.keep("p1", "a", "w1", memory=5000, resident_bytes=4000)  # the same cache, replaced
    assert book.keep("p1", "b", "w1", memory=5000, resident_bytes=4000)  # room for one more
    book.finished("p1", "b", "w1", {}, kept=True)
    assert not book.keep("p1", "c", "w1", memory=5000, resident_bytes=4000)
    assert book.keep("p1", "c", "w2", memory=5000, resident_bytes=4000)
    assert book.drop(["a", "c"]) == {"w1": ["a"]} and book.where == {("p1", "b"): "w1"}


@pytest.mark.parametrize("kind", OPTIMUM_DECODERS)
def test_decoders_exported_by_optimum_generate_the_tokens_of_the_whole_model(kind):
    path = optimum_decoder(kind)
    want = whole_model_tokens(path, PROMPTS, 6)
    for partitions in (2, 3):
        compiled = crowdgraph.compile(path, partitions=partitions, max_length=MAX_LENGTH)
        assert all(pair.shape for pair in compiled.decoder_layout.cache[:1]), "the cache's shape is fed on its own"
        with ThreadExecutor(workers=partitions + 1, memory="64MB") as executor:
            out = compiled.generate(PROMPTS, max_new_tokens=6, executor=executor)
        assert out[:, -6:].tolist() == want, partitions
        pasts = {pair.past for pair in compiled.decoder_layout.cache}
        with_state = [p for p in compiled.partitions if pasts & set(p.inputs)]
        assert sorted(n for n in compiled.last_report.kept.values() if n) == [3] * len(with_state)
    # The smallest budget that compiles (the cache's shape read off its stand-in), on four workers
    # that swap partitions, so the caches travel.
    original = onnx.load(path)
    layout = decoder_layout([i.name for i in original.graph.input], [o.name for o in original.graph.output])
    fed = feed_cache_shapes(original, layout)
    declared = {i.name: tuple(d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim)
                for i in fed.graph.input}
    fed_layout = decoder_layout([i.name for i in fed.graph.input], [o.name for o in fed.graph.output])
    smallest = crowdgraph.compile(path, smallest_budget(fed, generation_shapes(fed_layout, declared, MAX_LENGTH)),
                                  max_length=MAX_LENGTH)
    assert len(smallest.partitions) > 3
    assert smallest.generate(PROMPTS, max_new_tokens=6, executor="threads")[:, -6:].tolist() == want


def test_a_shape_read_of_the_cache_becomes_the_shape_of_an_empty_stand_in():
    """Shape(past, start=2) (the cache's length, as exports read it) gives the same values read off
    a stand-in of dims [batch, heads, past, 0], which holds no bytes."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Shape", ["past_key_values.0.key"], ["length"], start=2),
         helper.make_node("Shape", ["past_key_values.0.key"], ["whole"]),
         helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
         helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s", 1]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["b", 2, "p", 8])],
        [helper.make_tensor_value_info(n, t, None) for n, t in
         (("logits", TensorProto.FLOAT), ("present.0.key", TensorProto.FLOAT), ("length", TensorProto.INT64),
          ("whole", TensorProto.INT64))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    layout = decoder_layout(["input_ids", "past_key_values.0.key"], ["logits", "present.0.key"])
    fed = feed_cache_shapes(model, layout)
    assert feed_cache_shapes(fed, decoder_layout([i.name for i in fed.graph.input], ["logits", "present.0.key"])) is fed
    past = np.ones((3, 2, 5, 8), np.float32)
    want = run_session(open_session(model.SerializeToString()), {"input_ids": np.zeros((3, 1, 1), np.int64),
                                                                 "past_key_values.0.key": past})
    got = run_session(open_session(fed.SerializeToString()), {
        "input_ids": np.zeros((3, 1, 1), np.int64), "past_key_values.0.key": past,
        "past_key_values.0.key.shape": np.zeros((3, 2, 5, 0), np.float32)})
    assert got["length"].tolist() == want["length"].tolist() == [5, 8]
    assert got["whole"].tolist() == want["whole"].tolist() == [3, 2, 5, 8]


def test_a_decoder_without_cache_gives_the_same_tokens(model):
    plain = crowdgraph.compile(zoo.gpt2("tiny", use_cache=False), partitions=2, max_length=MAX_LENGTH)
    cached = crowdgraph.compile(model, partitions=2, max_length=MAX_LENGTH)
    assert plain.decoder_layout.cache == ()
    np.testing.assert_array_equal(plain.generate(PROMPTS, max_new_tokens=5),
                                  cached.generate(PROMPTS, max_new_tokens=5))


def test_past_and_present_of_a_layer_share_a_partition(model):
    compiled = crowdgraph.compile(model, partitions=4, max_length=MAX_LENGTH)
    for pair in compiled.decoder_layout.cache:
        (holder,) = [p for p in compiled.partitions if pair.present in p.outputs]
        assert pair.past in holder.inputs


def test_a_budget_that_does_not_fit_names_the_length_that_does(model):
    budget = smallest_generation_budget(model)
    with pytest.raises(BudgetError, match=r"max_length=\d+ fits it") as caught:
        crowdgraph.compile(model, budget, max_length=4 * MAX_LENGTH)
    fits = int(caught.value.args[0].split("max_length=")[-1].split()[0])
    assert MAX_LENGTH <= fits < 4 * MAX_LENGTH
    crowdgraph.compile(model, budget, max_length=fits)


def test_generation_errors_say_what_to_change(model):
    compiled = crowdgraph.compile(model, partitions=1, max_length=8)
    with pytest.raises(InputError, match="max_length=8"):
        compiled.generate([[1, 2, 3]], max_new_tokens=6)
    with pytest.raises(InputError, match="padded on the right"):
        compiled.generate(np.array([[1, 2, 0]]), attention_mask=np.array([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(InputError, match="max_new_tokens"):
        compiled.generate([[1]], max_new_tokens=0)
    with pytest.raises(InputError, match="temperature"):
        compiled.generate([[1]], max_new_tokens=1, do_sample=True, temperature=0)
    with pytest.raises(InputError, match="max_length= or input_shapes="):
        crowdgraph.compile(model, partitions=1, max_length=8, input_shapes={"input_ids": (1, 8)})
    with pytest.raises(ModelError, match="not a decoder"):
        crowdgraph.compile(zoo.distilbert("tiny"), partitions=1, max_length=8)


def test_decoder_layout_refuses_what_it_cannot_feed():
    with pytest.raises(ModelError, match="present.0.key"):
        decoder_layout(["input_ids", "past_key_values.0.key"], ["logits"])
    with pytest.raises(ModelError, match="token_type_ids"):
        decoder_layout(["input_ids", "token_type_ids"], ["logits"])
    with pytest.raises(ModelError, match="'input_ids'"):
        decoder_layout(["tokens"], ["logits"])


def test_left_padding_of_prompt_lists():
    ids, mask = left_padded([[1], [2, 3, 4]], pad_token_id=9)
    assert ids.tolist() == [[9, 9, 1], [2, 3, 4]] and mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    with pytest.raises(InputError, match="no tokens"):
        left_padded(np.array([[1, 2]]), np.array([[0, 0]]))


logit_rows = st.integers(1, 4).flatmap(lambda rows: st.integers(2, 30).flatmap(
    lambda vocab: st.lists(st.lists(st.floats(-20, 20, width=32), min_size=vocab, max_size=vocab),
                           min_size=rows, max_size=rows)))


@settings(max_examples=200, deadline=None)
@given(logit_rows, st.integers(1, 30), st.floats(0.05, 1.0), st.floats(0.1, 3.0), st.integers(0, 2**32 - 1))
def test_sampled_tokens_stay_within_top_k_and_top_p(rows, top_k, top_p, temperature, seed):
    logits = np.array(rows, np.float32)
    sampling = Sampling(True, temperature, top_k, top_p)
    tokens = pick_tokens(logits, sampling, np.random.default_rng(seed))
    assert tokens.tolist() == pick_tokens(logits, sampling, np.random.default_rng(seed)).tolist()
    for row, token in zip(logits.astype(np.float64) / temperature, tokens):
        order = np.argsort(-row, kind="stable")[:top_k]
        assert token in order
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        rank = list(order).index(token)
        assert rank == 0 or np.cumsum(probs)[rank - 1] < top_p  # the tokens before it did not reach top_p
    greedy = pick_tokens(logits, Sampling(), np.random.default_rng(seed))
    assert greedy.tolist() == logits.argmax(axis=1).tolist()
    assert pick_tokens(logits, Sampling(True, temperature, top_k=1), np.random.default_rng(seed)).tolist() == \
        np.argsort(-logits.astype(np.float64) / temperature, axis=1, kind="stable")[:, 0].tolist()


def test_the_generate_command_prints_each_step_and_the_report(capsys):
    from crowdgraph.cli import main

    argv = ["generate", "--size", "tiny", "--partitions", "2", "--max-length", "16", "--prompt-ids", "5,6,7",
            "--prompt-ids", "8", "--max-new-tokens", "4", "--workers", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    steps = [line.split(":")[1].split() for line in out.splitlines() if line.startswith("step ")]
    want = crowdgraph.compile(zoo.gpt2("tiny"), partitions=2, max_length=16).generate(
        [[5, 6, 7], [8]], max_new_tokens=4)[:, -4:]
    assert np.array(steps, dtype=np.int64).T.tolist() == want.tolist()
    assert "2 sequences, 4 prompt tokens, 8 new tokens in 4 steps" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt-ids", "1,x"])
    assert exit_info.value.code == 2
    assert "'1,x' is not a list of token ids" in capsys.readouterr().err


def test_simulated_phones_carry_their_partitions_from_step_to_step(model):
    compiled = crowdgraph.compile(model, partitions=3, max_length=MAX_LENGTH)
    phones = [crowdgraph.WorkerInfo(f"phone{n}", memory="64MB", speed=s) for n, s in enumerate((1.0, 0.8, 0.6))]
    one = crowdgraph.simulate_generation(compiled, phones, sequences=1, prompt_length=6, new_tokens=8)
    four = crowdgraph.simulate_generation(compiled, phones, sequences=4, prompt_length=6, new_tokens=8)
    assert four.tokens == 32 and four.steps == 8 and len(four.runs) == 8
    assert [len(run.tasks) for run in four.runs] == [4 * 3] * 8
    assert len(four.runs[0].loads) == 3 and not any(run.loads for run in four.runs[1:]), "warm after the prefill"
    assert four.tokens_per_second > 1.5 * one.tokens_per_second, "sequences in flight fill the pipeline"
    # The prefill reads 6 tokens, a decoding step one: steps after the first cost less.
    compute = [sum(t.end - t.start for t in run.tasks) for run in four.runs]
    assert compute[0] > compute[1]
    assert compute[1] <= compute[-1], "the cache grows, so later steps cost a little more"
    # Three phones for three partitions keep the caches: after the prefill (which reads empty ones)
    # a step moves less than when every cache is sent with it.
    sent = crowdgraph.simulate_generation(compiled, phones, sequences=4, prompt_length=6, new_tokens=8,
                                          keep_caches=False)
    kept_bytes, sent_bytes = ([sum(t.bytes_in for t in run.tasks) for run in r.runs] for r in (four, sent))
    assert kept_bytes[0] == sent_bytes[0] and all(k < s for k, s in zip(kept_bytes[1:], sent_bytes[1:]))
    assert sent.seconds >= four.seconds


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_an_exported_decoder_generates_the_tokens_of_transformers(kind):
    """GPT-2 (learned positions, multi-head) and Llama (rotary, grouped-query) exported with their cache."""
    import torch

    from .models import decoder_torch_model, exported_decoder

    compiled = crowdgraph.compile(str(exported_decoder(kind)), partitions=3, max_length=MAX_LENGTH)
    assert len(compiled.partitions) == 3 and len(compiled.decoder_layout.cache) == 4
    out = compiled.generate(PROMPTS, max_new_tokens=6)
    model = decoder_torch_model(kind)
    with torch.no_grad():
        for row, prompt in enumerate(PROMPTS):
            want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
            assert out[row, -6:].tolist() == want[0, len(prompt):].tolist()


@pytest.mark.slow
def test_an_exported_decoder_with_external_data_generates_the_same_tokens(tmp_path):
    from .models import exported_decoder

    path = str(exported_decoder("gpt2"))
    external = tmp_path / "decoder.onnx"
    onnx.save(onnx.load(path), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
              location="decoder.onnx.data", size_threshold=0)
    assert (tmp_path / "decoder.onnx.data").stat().st_size > 500_000  # the weights are outside the .onnx
    inline = crowdgraph.compile(path, partitions=2, max_length=MAX_LENGTH).generate(PROMPTS, max_new_tokens=5)
    apart = crowdgraph.compile(str(external), partitions=2, max_length=MAX_LENGTH).generate(PROMPTS, max_new_tokens=5)
    np.testing.assert_array_equal(inline, apart)


@pytest.mark.slow
def test_one_forward_pass_of_an_exported_decoder_compiles_without_max_length():
    """The mask's dim is declared 'past_sequence + sequence': bound as the sum, it agrees with the cache."""
    from .models import exported_decoder
    from .oracle import assert_matches, oracle

    path = str(exported_decoder("llama"))
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1, 500, (2, 3)), "attention_mask": np.ones((2, 7), np.int64),
             "position_ids": np.tile(np.arange(4, 7), (2, 1)),
             **{f"past_key_values.{i}.{k}": rng.standard_normal((2, 2, 4, 16)).astype(np.float32)
                for i in range(2) for k in ("key", "value")}}
    compiled = crowdgraph.compile(path, partitions=2)
    assert_matches(compiled.run(feeds, microbatch=1), oracle(path, feeds))
