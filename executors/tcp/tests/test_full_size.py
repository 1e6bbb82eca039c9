"""The exported full-size DistilBERT over TCP (slow).

The embedded full-size model's budget promise per worker process is in test_memory_instant.py,
which shares its plan.
"""

from __future__ import annotations

import pytest

import crowdgraph
from crowdgraph_tcp import TcpExecutor
from tests import models
from tests.oracle import assert_matches, oracle

pytestmark = pytest.mark.slow


def test_exported_transformers_distilbert_matches_the_oracle():
    path = models.exported_distilbert("full")
    feeds = models.exported_distilbert_inputs(2, 64, size="full")
    compiled = crowdgraph.compile(str(path), "128MB", input_shapes={k: (1, 64) for k in feeds})
    with TcpExecutor.local(workers=4, memory="128MB") as ex:
        got = compiled.run(feeds, executor=ex, microbatch=1, mode="barrier", timeout=300)
    assert_matches(got, oracle(str(path), feeds))
