"""Dask workers keep partitions on their disks: a second run on the same cluster loads them at tier 2."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crowdgraph
from crowdgraph import zoo
from tests.oracle import assert_matches, oracle

distributed = pytest.importorskip("distributed")
from crowdgraph_dask import DaskExecutor  # noqa: E402
from crowdgraph_dask._cache import DiskCache  # noqa: E402


def test_a_second_run_on_the_same_cluster_loads_from_the_workers_disks(cluster_options, tmp_path) -> None:
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=4, sequence=16)
    compiled = crowdgraph.compile(model, partitions=4, input_shapes={k: (2, 16) for k in feeds})
    names = {p.sha256: p.name for p in compiled.partitions}
    want = oracle(model, feeds)
    # One worker, so it loads (and keeps) every partition.
    with distributed.LocalCluster(**cluster_options(n_workers=1)) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        with DaskExecutor(client, cache_dir=tmp_path) as executor:
            assert_matches(compiled.run(feeds, executor=executor, microbatch=2, mode="barrier", timeout=60), want)
            first = compiled.last_report
            got = compiled.run(feeds, executor=executor, microbatch=2, mode="barrier", timeout=60)
            second = compiled.last_report
        assert_matches(got, want)
        assert sorted(ld.partition for ld in first.loads if not ld.from_cache) == sorted(names.values())
        assert first.weight_bytes_sent == sum(len(p.model_bytes) for p in compiled.partitions)
        assert second.loads and all(ld.from_cache and ld.bytes_sent == 0 for ld in second.loads)
        assert second.weight_bytes_sent == 0
        # (the partition the first run left resident may run at tier 1)
        assert second.tier_counts.get(2, 0) >= len(names) - 1 and not {3, 4} & set(second.tier_counts)

        # What a new executor knows it learns from the worker; a file changed on disk is caught.
        files = {p.name[:64]: p for p in tmp_path.glob("*/*.onnx")}
        assert sorted(files) == sorted(names)
        changed = compiled.partitions[2]
        data = bytearray(files[changed.sha256].read_bytes())
        data[len(data) // 2] ^= 0xFF
        files[changed.sha256].write_bytes(bytes(data))
        with DaskExecutor(client, cache_dir=tmp_path) as executor:
            got = compiled.run(feeds, executor=executor, microbatch=2, mode="barrier", timeout=60)
            third = compiled.last_report
        assert_matches(got, want)
        assert [ld.partition for ld in third.loads if not ld.from_cache] == [changed.name]
        assert third.weight_bytes_sent == len(changed.model_bytes)
        assert third.tier_counts.get(2) == len(names) and not {3, 4} & set(third.tier_counts)
        assert hashlib.sha256(files[changed.sha256].read_bytes()).hexdigest() == changed.sha256  # stored again


def test_cache_size_zero_keeps_nothing(client, tmp_path) -> None:
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=2, sequence=16)
    compiled = crowdgraph.compile(model, partitions=2, sample=feeds)
    with DaskExecutor(client, cache_dir=tmp_path, cache_size=0) as executor:
        for _ in range(2):
            assert_matches(compiled.run(feeds, executor=executor, timeout=60), oracle(model, feeds))
            assert not any(ld.from_cache for ld in compiled.last_report.loads)
    assert not list(tmp_path.rglob("*.onnx"))


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["put", "get"]), st.integers(0, 7), st.integers(1, 40)),
                      min_size=1, max_size=20), bound=st.integers(1, 100))
def test_the_disk_cache_is_least_recently_used_within_its_bound(tmp_path_factory, steps, bound) -> None:
    """Against a model of LRU order: same entries, same order, never above the bound, contents intact."""
    cache = DiskCache(tmp_path_factory.mktemp("cache"), max_bytes=bound)
    blobs = {n: bytes([n]) * (n * 5 + 1) for n in range(8)}  # entry n always has the same bytes
    sha = {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}
    order: list[int] = []  # least recently used first
    for op, n, _ in steps:
        if op == "put":
            fits = len(blobs[n]) <= bound
            assert cache.put(sha[n], blobs[n]) == fits
            if fits:
                if n in order:
                    order.remove(n)
                while sum(len(blobs[m]) for m in order) + len(blobs[n]) > bound:
                    order.pop(0)
                order.append(n)
        else:
            assert cache.get(sha[n]) == (blobs[n] if n in order else None)
            if n in order:
                order.remove(n)
                order.append(n)
        assert cache.digests() == [sha[m] for m in reversed(order)]
        assert sum(len(blobs[m]) for m in order) <= bound
