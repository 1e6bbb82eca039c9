"""Generate tokens with a decoder split across a crowd of thread workers.

The embedded GPT-2-shaped decoder (7M parameters, random weights) is cut
to a 16 MB budget that holds every step up to 48 tokens, key/value cache
included; three prompts are decoded greedily on five thread workers of
32 MB (a worker for every partition, with room for every sequence's
cache: each worker keeps the caches of the layers it runs) and checked
against the same loop on one whole-model onnxruntime session, then one
prompt is sampled step by step.

Run it: ``python examples/generate.py``
"""

from __future__ import annotations

import numpy as np

import crowdgraph
from crowdgraph import ThreadExecutor, zoo
from crowdgraph.generate import decode, left_padded
from crowdgraph.runtime import open_session, run_session

PROMPTS = [[464, 3290, 318], [40, 1101], [7454, 2402, 257, 640]]


def main() -> None:
    model = zoo.gpt2("small")
    compiled = crowdgraph.compile(model, "16MB", max_length=48)
    print(compiled.table())
    with ThreadExecutor(workers=5, memory="32MB") as executor:
        tokens = compiled.generate(PROMPTS, max_new_tokens=12, executor=executor)
        report = compiled.last_report
        print(report)
        print("sampled, step by step:", end="")
        for step in compiled.generate([PROMPTS[0]], max_new_tokens=8, executor=executor, stream=True,
                                      do_sample=True, top_k=50, temperature=0.8, seed=0):
            print(f" {step.tokens[0]}", end="", flush=True)
        print()

    session = open_session(model.SerializeToString())
    caches = {t.name: (t.dims[1], t.dims[3]) for t in compiled.inputs if t.name.startswith("past_key_values.")}
    ids, mask = left_padded(PROMPTS)
    whole = [s.tokens for s in decode(lambda feeds: run_session(session, feeds), compiled.decoder_layout, caches,
                                      ids, mask, max_new_tokens=12)]
    print("greedy tokens:")
    print(tokens[:, ids.shape[1]:])
    print(f"tokens equal to the whole model: {np.array_equal(tokens[:, ids.shape[1]:], np.stack(whole, axis=1))}")
    print(f"caches kept on the workers: {sum(report.kept.values())} (sequences x partitions with a cache)")


if __name__ == "__main__":
    main()
