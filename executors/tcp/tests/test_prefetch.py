"""Weights ahead of need over TCP: STORE puts a partition on a worker's disk, never in its memory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import crowdgraph
from crowdgraph import zoo
from crowdgraph.runtime import open_session, run_session
from crowdgraph_tcp import TcpExecutor

REPO = Path(__file__).resolve().parents[3]


def test_the_prefetch_example_reads_stored_partitions_from_disk(tcp_helpers):
    done = subprocess.run([sys.executable, str(REPO / "examples" / "tcp_prefetch.py")], env=tcp_helpers.child_env(),
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 0, done.stderr
    found = re.findall(r"prefetch=(\w+): (\d+) partitions stored ahead; (\d+) of (\d+) loads read from disk; "
                       r"tiers (\{.*?\}); partition bytes sent with loads (\d+); "
                       r"max abs difference to the whole model: (\S+)", done.stdout)
    assert [f[0] for f in found] == ["False", "True"], done.stdout
    (_, stored_off, disk_off, _, tiers_off, sent_off, diff_off), (_, stored_on, disk_on, _, tiers_on, sent_on, diff_on) = found
    assert max(float(diff_off), float(diff_on)) <= 1e-4
    assert (int(stored_off), int(disk_off)) == (0, 0) and "2:" not in tiers_off
    assert int(stored_on) > 0 and int(disk_on) > 0 and "2:" in tiers_on
    assert int(sent_on) < int(sent_off)  # the stored partitions' loads sent no bytes


def test_a_partition_the_worker_does_not_keep_is_sent_with_its_load():
    """A cache too small for any partition: every STORE is answered kept=false,
    and each load still gets the bytes (a missed cache read sends them)."""
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=4, sequence=16)
    compiled = crowdgraph.compile(model, partitions=6, sample={k: v[:1] for k, v in batch.items()})
    expected = run_session(open_session(model.SerializeToString()), batch)
    with TcpExecutor.local(workers=2, memory="64MB", cache_size="1KB", prefetch=True) as executor:
        outputs = compiled.run(batch, executor=executor, microbatch=1, timeout=60)
        logs = "".join(path.read_text() for path in executor.logs.values() if path.exists())
    report = compiled.last_report
    np.testing.assert_allclose(outputs["logits"], expected["logits"], atol=1e-4)
    assert report.stored and not any(load.from_cache for load in report.loads)
    assert "did not keep partition" in logs and "larger than the whole cache" in logs
