"""DaskExecutor on a real LocalCluster (loopback, worker processes, one thread each)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import numpy as np
import pytest

import crowdgraph
from crowdgraph import Job, Reporter, zoo
from crowdgraph.errors import ExecutionError, InputError, PlanningError, WorkerLostError
from crowdgraph.executor import installed_executors, resolve_executor
from tests.models import OPTIMUM_DECODERS, chain, diamond, optimum_decoder, skip, whole_model_tokens
from tests.oracle import assert_matches, oracle

distributed = pytest.importorskip("distributed")
from crowdgraph_dask import DaskExecutor, TensorHandle  # noqa: E402
from crowdgraph_dask import _worker  # noqa: E402



def _url(cluster: Any) -> str:
    return "dask://" + cluster.scheduler_address.split("://", 1)[1]


def _sessions(client: Any) -> dict[str, Any]:
    return {a: p["sha256"] for a, p in client.run(_worker.probe).items()}


def _crowdgraph_keys(client: Any) -> list[str]:
    return [k for k in client.who_has() if str(k).startswith("crowdgraph-")]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, dict[str, np.ndarray], Any, dict[str, np.ndarray]]:
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=8, sequence=16)
    compiled = crowdgraph.compile(model, partitions=4, sample=feeds)
    return model, feeds, compiled, oracle(model, feeds)


def _job(compiled: Any) -> Job:
    return Job({p.name: p for p in compiled.partitions}, compiled.memory_budget)


# -- outputs ---------------------------------------------------------------


def test_the_entry_point_is_installed() -> None:
    assert "dask" in installed_executors(), "pip install -e executors/dask registers the entry point"


@pytest.mark.parametrize("mode", ["streaming", "barrier"])
def test_distilbert_matches_the_oracle_with_a_client_passed_as_is(client, tiny, mode) -> None:
    _, feeds, compiled, want = tiny
    got = compiled.run(feeds, executor=client, microbatch=3, mode=mode, timeout=60)
    report = compiled.last_report
    assert_matches(got, want)
    assert report.executor == "dask"
    assert len(report.tasks) == len(compiled.partitions) * 3
    assert set(report.workers) <= set(client.scheduler_info(n_workers=-1)["workers"])
    assert all(t.end >= t.start for t in report.tasks)
    # Loads from a worker's disk cache (an earlier test on this cluster may have left one) send nothing.
    assert report.weight_bytes_sent == sum(len(compiled[ld.partition].model_bytes)
                                           for ld in report.loads if not ld.from_cache)
    assert client.status == "running", "a Client passed in stays open"


@pytest.mark.parametrize("case", [diamond, skip, chain])
@pytest.mark.parametrize("mode", ["streaming", "barrier"])
def test_small_graphs_match_the_oracle(client, case, mode) -> None:
    model, feeds = case(batch=6)
    compiled = crowdgraph.compile(model, partitions=3, sample=feeds)
    with DaskExecutor(client) as executor:
        got = compiled.run(feeds, executor=executor, microbatch=2, mode=mode, timeout=60)
    assert_matches(got, oracle(model, feeds))


def test_a_reused_executor_keeps_partitions_resident(client, tiny) -> None:
    model, feeds, _, want = tiny
    # One partition: every worker that ran it in the first run still holds it.
    compiled = crowdgraph.compile(model, partitions=1, sample=feeds)
    with DaskExecutor(client) as executor:
        compiled.run(feeds, executor=executor, microbatch=4, timeout=60)
        first = compiled.last_report
        got = compiled.run(feeds, executor=executor, microbatch=4, timeout=60)
        second = compiled.last_report
    assert_matches(got, want)
    assert first.loads and not second.loads, "the second run finds every partition resident"
    assert second.tier_counts == {1: len(second.tasks)}
    remote = sum(t.wire_in for t in second.tasks)
    assert 0 < remote <= sum(t.bytes_in for t in second.tasks)


def test_dask_url_goes_through_the_entry_point(cluster, tiny) -> None:
    _, feeds, compiled, want = tiny
    got = compiled.run(feeds, executor=_url(cluster), microbatch=4, timeout=60)
    assert_matches(got, want)
    executor, owned = resolve_executor(_url(cluster))
    assert isinstance(executor, DaskExecutor) and owned
    executor.close()
    assert executor.client.status == "closed", "a Client made from a URL is closed with its executor"


def test_a_client_is_accepted_and_left_open(client) -> None:
    assert DaskExecutor.accepts(client) and not DaskExecutor.accepts(object())
    executor, owned = resolve_executor(client)
    assert isinstance(executor, DaskExecutor) and owned
    executor.close()
    assert client.status == "running"
    with pytest.raises(InputError):
        DaskExecutor(object())


def test_an_unreachable_scheduler_is_a_clear_error() -> None:
    with pytest.raises(ExecutionError, match="dask scheduler"):
        DaskExecutor.from_url("dask://127.0.0.1:1", timeout=1)
    with pytest.raises(InputError):
        DaskExecutor.from_url("http://127.0.0.1:8786")


# -- the protocol, step by step -------------------------------------------


def test_load_run_unload_report_in_order_with_worker_measurements(client, tiny) -> None:
    _, feeds, compiled, _ = tiny
    part = compiled.partitions[0]
    reporter = Reporter()
    with DaskExecutor(client) as executor:
        workers = executor.start(_job(compiled), reporter)
        w = workers[0].id
        inputs = {k: feeds[k] for k in part.inputs}
        executor.load(w, part)
        executor.run(w, (part.name, 0), part, inputs)
        executor.unload(w, part.name)
        notices = [reporter.next(30) for _ in range(3)]
        assert [n.kind for n in notices] == ["loaded", "finished", "unloaded"]
        finished = notices[1]
        assert all(isinstance(v, TensorHandle) for v in finished.outputs.values())
        stats = finished.stats
        assert stats.start <= stats.end and stats.rss > 0
        assert stats.bytes_in == sum(v.nbytes for v in inputs.values())
        assert stats.wire_in == stats.bytes_in, "model inputs travel from the client"
        got = executor.gather(dict(finished.outputs))
        want = crowdgraph.runtime.run_session(crowdgraph.runtime.open_session(part.model_bytes), inputs)
        assert_matches(got, want)
        assert stats.bytes_out == sum(v.nbytes for v in want.values())
        assert _sessions(client)[w] is None
        executor.forget(list(finished.outputs.values()))


def test_a_run_without_its_partition_is_reported_as_failed(client, tiny) -> None:
    _, feeds, compiled, _ = tiny
    part = compiled.partitions[1]
    reporter = Reporter()
    with DaskExecutor(client) as executor:
        w = executor.start(_job(compiled), reporter)[0].id
        executor.run(w, (part.name, 0), part, {k: np.zeros((1, 1), np.float32) for k in part.inputs})
        notice = reporter.next(30)
        assert notice is not None and notice.kind == "failed"
        assert notice.key == (part.name, 0) and "not loaded" in (notice.error or "")


def test_reset_drops_every_session_and_the_executor_runs_again(client, tiny) -> None:
    _, feeds, compiled, want = tiny
    reporter = Reporter()
    with DaskExecutor(client) as executor:
        workers = executor.start(_job(compiled), reporter)
        for w, part in zip(workers, compiled.partitions):
            executor.load(w.id, part)
        for _ in workers:
            assert reporter.next(30).kind == "loaded"
        assert all(_sessions(client).values())
        p0 = compiled.partitions[0]
        executor.run(workers[0].id, (p0.name, 0), p0, {k: feeds[k] for k in p0.inputs})
        executor.reset()
        assert not any(_sessions(client).values()), "reset() leaves no session open"
        got = compiled.run(feeds, executor=executor, microbatch=4, timeout=60)
    assert_matches(got, want)


def test_close_leaves_no_futures_sessions_or_threads(client, tiny, wait_for) -> None:
    _, feeds, compiled, want = tiny
    client.submit(int, 1).add_done_callback(lambda f: None)  # Dask's own callback thread exists before
    before = set(threading.enumerate())
    executor = DaskExecutor(client)
    assert_matches(compiled.run(feeds, executor=executor, microbatch=2, timeout=60), want)
    executor.close()
    executor.close()  # twice is fine
    wait_for(lambda: not _crowdgraph_keys(client), what="crowdgraph's futures to be released")
    assert not any(_sessions(client).values())
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, left
    with pytest.raises(ExecutionError, match="closed"):
        executor.start(_job(compiled), Reporter())


# -- budgets ---------------------------------------------------------------


def _budgets(cluster_options: Any, **kwargs: Any) -> list[int]:
    options = cluster_options(n_workers=2, processes=False)
    options.update(kwargs)
    model, feeds = chain(batch=2)
    compiled = crowdgraph.compile(model, partitions=2, sample=feeds)
    with distributed.LocalCluster(**options) as cluster, distributed.Client(cluster, set_as_default=False) as c:
        with DaskExecutor(c) as executor:
            return [w.memory for w in executor.start(_job(compiled), Reporter())]


def test_budget_is_the_workers_memory_limit(cluster_options) -> None:
    assert _budgets(cluster_options, memory_limit="300MB") == [300_000_000] * 2


def test_budget_is_the_crowdgraph_memory_resource_when_declared(cluster_options) -> None:
    assert _budgets(cluster_options, memory_limit="300MB", resources={"crowdgraph_memory": 64e6}) == [64_000_000] * 2


def test_a_crowd_too_small_for_a_partition_fails_before_running(cluster_options) -> None:
    model, feeds = chain(batch=2)
    compiled = crowdgraph.compile(model, partitions=2, sample=feeds)
    options = cluster_options(n_workers=1, processes=False, resources={"crowdgraph_memory": 1e6})
    with distributed.LocalCluster(**options) as cluster, distributed.Client(cluster, set_as_default=False) as c:
        with pytest.raises(PlanningError):
            compiled.run(feeds, executor=c, timeout=60)


# -- losing workers ----------------------------------------------------------


class _Spy:
    """A Reporter stand-in that calls ``hook(worker, n)`` after the n-th finished task."""

    def __init__(self, inner: Reporter, hook: Any):
        self.inner, self.hook, self.n = inner, hook, 0
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name not in ("worker_lost", "results_lost", "worker_joined"):
            return method

        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args))
            return method(*args, **kwargs)

        return record

    def task_finished(self, worker: str, *args: Any, **kwargs: Any) -> None:
        self.inner.task_finished(worker, *args, **kwargs)
        self.n += 1
        self.hook(worker, self.n)


class _KillingExecutor(DaskExecutor):
    def __init__(self, client: Any, kill: Any, after: int):
        super().__init__(client)
        self.kill, self.after, self.victim = kill, after, None
        self.spy: _Spy | None = None

    def start(self, job: Job, reporter: Reporter) -> Any:
        def hook(worker: str, n: int) -> None:
            if n == self.after and self.victim is None:
                self.victim = worker
                threading.Thread(target=self.kill, args=(worker,), daemon=True).start()

        self.spy = _Spy(reporter, hook)
        return super().start(job, self.spy)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "retire"])
def test_a_worker_leaving_mid_run_is_survived(how, wait_for, cluster_options) -> None:
    model, feeds = chain(n_layers=6, width=384, batch=96)
    compiled = crowdgraph.compile(model, partitions=3, sample=feeds)
    want = oracle(model, feeds)
    with distributed.LocalCluster(**cluster_options()) as cluster, \
            distributed.Client(cluster, set_as_default=False) as c:
        pids = c.run(os.getpid)

        def kill(worker: str) -> None:
            if how == "sigkill":
                os.kill(pids[worker], signal.SIGKILL)  # the nanny starts a fresh worker
            else:
                c.retire_workers([worker])

        with _KillingExecutor(c, kill, after=12) as executor:
            got = compiled.run(feeds, executor=executor, microbatch=4, timeout=120)
            report = compiled.last_report
        assert_matches(got, want)
        victim = executor.victim
        assert victim is not None and report.workers[victim].lost
        assert executor.spy is not None
        calls = [name for name, _ in executor.spy.calls]
        assert ("worker_lost", (victim, report.workers[victim].lost)) in executor.spy.calls
        if how == "sigkill":  # its latest result was not fetched yet
            assert "results_lost" in calls, calls
        assert len(report.tasks) >= len(compiled.partitions) * 24
        wait_for(lambda: not _crowdgraph_keys(c), what="crowdgraph's futures to be released")


def test_a_worker_joining_the_cluster_joins_the_crowd(cluster_options, tiny) -> None:
    _, _, compiled, _ = tiny
    options = cluster_options(n_workers=1, processes=False, memory_limit="300MB")
    with distributed.LocalCluster(**options) as cluster, distributed.Client(cluster, set_as_default=False) as c:
        reporter = Reporter()
        with DaskExecutor(c, poll_interval=0.1) as executor:
            [first] = executor.start(_job(compiled), reporter)
            cluster.scale(2)
            notice = reporter.next(30)
            assert notice is not None and notice.kind == "joined"
            assert notice.info.id != first.id and notice.info.memory == 300_000_000


def test_results_lost_with_their_worker_are_reported_and_never_gathered(cluster_options, tiny) -> None:
    _, feeds, compiled, _ = tiny
    part = compiled.partitions[0]
    with distributed.LocalCluster(**cluster_options(n_workers=2)) as cluster, \
            distributed.Client(cluster, set_as_default=False) as c:
        pids = c.run(os.getpid)
        reporter = Reporter()
        with DaskExecutor(c) as executor:
            w = executor.start(_job(compiled), reporter)[0].id
            executor.load(w, part)
            executor.run(w, (part.name, 0), part, {k: feeds[k] for k in part.inputs})
            loaded, finished = reporter.next(30), reporter.next(30)
            assert (loaded.kind, finished.kind) == ("loaded", "finished")
            os.kill(pids[w], signal.SIGKILL)
            seen = {}
            while "lost" not in seen or "results_lost" not in seen:
                notice = reporter.next(30)
                assert notice is not None, f"only saw {sorted(seen)}"
                seen[notice.kind] = notice
            assert seen["lost"].worker == w and w in seen["lost"].reason
            assert seen["results_lost"].keys == ((part.name, 0),)
            with pytest.raises(WorkerLostError, match="run the batch again"):
                executor.gather(dict(finished.outputs))


def test_decoders_exported_by_optimum_keep_their_caches_on_the_dask_workers(client) -> None:
    """A worker per partition (three of each): every sequence's cache stays on the worker that runs its
    layers, and the tokens are the whole model's."""
    prompts = [[5, 6, 7], [8], [9, 10]]
    with DaskExecutor(client) as executor:
        for kind in OPTIMUM_DECODERS:
            path = optimum_decoder(kind)
            compiled = crowdgraph.compile(path, partitions=3, max_length=16)
            out = compiled.generate(prompts, max_new_tokens=6, executor=executor, timeout=120)
            assert out[:, -6:].tolist() == whole_model_tokens(path, prompts, 6), kind
            assert any(n == len(prompts) for n in compiled.last_report.kept.values()), compiled.last_report.kept
