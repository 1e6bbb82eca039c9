"""Browser workers: headless Chromium pages join a TcpExecutor(web=True) next to Python workers.

Skipped, with the reason shown, where Chromium or onnxruntime-web (``make web``)
is not installed; ``make test`` installs both where it can, so CI never skips.
Only 127.0.0.1 is used.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crowdgraph
from crowdgraph import zoo
from crowdgraph_tcp import TcpExecutor
from crowdgraph_tcp.web import ORT_FILES, WEB_ROOT, assets_missing
from tests import models
from tests.oracle import assert_matches, oracle

def _helper():
    import importlib.util
    import sys
    from pathlib import Path

    name = "crowdgraph_tcp_tests_browser"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("browser.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


Chromium, find_chromium = _helper().Chromium, _helper().find_chromium

CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip("chromium not installed: browser-worker tests need it (apt-get install chromium; "
                "`make test` does this when run as root)", allow_module_level=True)
if assets_missing():
    pytest.skip(f"onnxruntime-web not installed: run `make web` (npm ci in {WEB_ROOT})", allow_module_level=True)

RUN_TIMEOUT = 90.0


def page_url(ex: TcpExecutor, query: str = "", token: str | None = None) -> str:
    url = ex.join_url
    assert url is not None and "#token=" in url
    base, fragment = url.split("#", 1)
    if token is not None:
        fragment = f"token={token}"
    return f"{base}{'?' + query if query else ''}#{fragment}"


def join(browser: Chromium, ex: TcpExecutor, query: str = "memory=600"):
    page = browser.open(page_url(ex, query))
    state = page.wait_for(lambda s: s.get("status") == "connected", 60, "the page to join")
    return page, state


@pytest.fixture(scope="module")
def browser():
    with Chromium(CHROMIUM) as b:
        yield b


@pytest.fixture(scope="module")
def crowd(browser):
    """Two Python workers and two pages: one single-threaded with the pure-JS HMAC, one multi-threaded."""
    with TcpExecutor.local(memory=["16MB", "24MB"], web=True) as ex:
        one, s1 = join(browser, ex, "memory=600&threads=1&purejs=1")
        two, s2 = join(browser, ex, "memory=600")
        assert s1["threads"] == 1 and s2["threads"] >= 2 and s2["isolated"], (s1, s2)
        yield ex, [one, two], {s1["workerId"], s2["workerId"]}
        one.close()
        two.close()


def tiny_case():
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=6, sequence=16)
    return model, feeds, crowdgraph.compile(model, partitions=4, input_shapes={k: (1, 16) for k in feeds})


def cnn_case():
    model, feeds = models.light_cnn("squeezenet")
    return model, feeds, crowdgraph.compile(model, partitions=4, sample=feeds)


CASES = {"distilbert-tiny": tiny_case, "squeezenet": cnn_case}


@pytest.mark.parametrize("mode", ["streaming", "barrier"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_mixed_crowd_matches_the_oracle(crowd, case, mode):
    ex, pages, browser_ids = crowd
    model, feeds, compiled = CASES[case]()
    batch = next(iter(feeds.values())).shape[0]
    got = compiled.run(feeds, executor=ex, microbatch=max(1, batch // 3), mode=mode, timeout=RUN_TIMEOUT)
    report = compiled.last_report
    assert_matches(got, oracle(model, feeds))
    workers = {t.worker for t in report.tasks}
    assert workers & browser_ids, f"no task ran in a browser: {sorted(workers)}"
    assert workers - browser_ids, f"no task ran on a Python worker: {sorted(workers)}"


def test_a_mixed_crowd_generates_the_tokens_of_the_whole_model(crowd):
    """A decoder whose cache starts empty (zero-length tensors) and grows, on pages and Python workers."""
    from crowdgraph.generate import decode, left_padded
    from crowdgraph.runtime import open_session, run_session

    ex, pages, browser_ids = crowd
    model = zoo.gpt2("tiny")
    compiled = crowdgraph.compile(model, partitions=4, max_length=16)
    prompts = [[5, 6, 7], [8], [9, 10]]
    steps = list(compiled.generate(prompts, max_new_tokens=5, executor=ex, stream=True, timeout=RUN_TIMEOUT))
    session = open_session(model.SerializeToString())
    caches = {t.name: (t.dims[1], t.dims[3]) for t in compiled.inputs if t.name.startswith("past_key_values.")}
    ids, mask = left_padded(prompts)
    want = decode(lambda feeds: run_session(session, feeds), compiled.decoder_layout, caches, ids, mask,
                  max_new_tokens=5)
    for got, expected in zip(steps, want, strict=True):
        assert got.tokens.tolist() == expected.tokens.tolist()
        assert float(np.nanmax(np.abs(got.logits - expected.logits))) <= 1e-4
    workers = {t.worker for run in compiled.last_report.runs for t in run.tasks}
    assert workers & browser_ids, f"no task ran in a browser: {sorted(workers)}"


def test_pages_keep_the_caches_of_the_layers_they_run(browser):
    """Both partitions of the plan read a cache; one Python worker and two pages hold them, so at
    least one page keeps every sequence's cache between steps and the tokens stay the same."""
    from crowdgraph.generate import decode, left_padded
    from crowdgraph.runtime import open_session, run_session

    model = zoo.gpt2("tiny")
    compiled = crowdgraph.compile(model, partitions=2, max_length=16)
    prompts = [[5, 6, 7], [8], [9, 10]]
    with TcpExecutor.local(memory=["16MB"], web=True) as ex:
        pages = [join(browser, ex) for _ in range(2)]
        got = compiled.generate(prompts, max_new_tokens=5, executor=ex, timeout=RUN_TIMEOUT)
        for page, _ in pages:
            page.close()
    report = compiled.last_report
    session = open_session(model.SerializeToString())
    caches = {t.name: (t.dims[1], t.dims[3]) for t in compiled.inputs if t.name.startswith("past_key_values.")}
    ids, mask = left_padded(prompts)
    want = np.stack([s.tokens for s in decode(lambda feeds: run_session(session, feeds), compiled.decoder_layout,
                                              caches, ids, mask, max_new_tokens=5)], axis=1)
    assert got[:, ids.shape[1]:].tolist() == want.tolist()
    browser_ids = {state["workerId"] for _, state in pages}
    assert any(report.kept.get(b, 0) == len(prompts) for b in browser_ids), report.kept


def test_closing_a_page_mid_run_still_matches_the_oracle(browser, tcp_helpers):
    model, feeds, compiled = tiny_case()
    with TcpExecutor.local(memory=["24MB"], web=True, heartbeat=1.0) as ex:
        pages = [join(browser, ex)[0] for _ in range(2)]
        run = tcp_helpers.BackgroundRun(compiled, feeds, ex, microbatch=1, timeout=RUN_TIMEOUT)
        closed = None
        deadline = time.monotonic() + 60
        while closed is None and run.running() and time.monotonic() < deadline:
            for page in pages:
                if page.state().get("tasks", 0) >= 1:
                    page.close()
                    closed = page
                    break
            time.sleep(0.02)
        outputs = run.result(RUN_TIMEOUT)
        assert closed is not None, "no page ran a task before the run ended"
        assert_matches(outputs, oracle(model, feeds))
        for page in pages:
            page.close()


def reload(page, ex: TcpExecutor, query: str) -> dict:
    """Open the join URL again in ``page``; the page's state once it rejoined as a new worker."""
    before = page.state().get("workerId")
    # The token was scrubbed from the address bar, so a reload is opening the join URL again (from
    # another document: the same URL with only a new fragment would not load the page again).
    page.send("Page.navigate", {"url": "about:blank"})
    page.send("Page.navigate", {"url": page_url(ex, query)})
    return page.wait_for(lambda s: s.get("status") == "connected" and s.get("workerId") not in (None, before),
                         60, "the reloaded page to rejoin")


#: Flips one byte in the middle of a partition the page keeps in the Origin Private File System.
CORRUPT_OPFS_ENTRY = """(async () => {
  const folder = await (await navigator.storage.getDirectory()).getDirectoryHandle("crowdgraph-partitions");
  const handle = await folder.getFileHandle("%s.onnx");
  const bytes = new Uint8Array(await (await handle.getFile()).arrayBuffer());
  bytes[bytes.length >> 1] ^= 0xff;
  const out = await handle.createWritable();
  await out.write(bytes);
  await out.close();
  return bytes.length;
})()"""


@pytest.mark.parametrize("store", ["opfs", "indexeddb"])
def test_a_page_reloaded_mid_crowd_rejoins_and_loads_from_its_cache(browser, store):
    """The page keeps what it loaded; reloaded, it announces it in HELLO and its loads are tier 2.

    Over OPFS one entry is also changed on disk after the page announced it:
    the page's sha256 check refuses it and the coordinator sends those bytes.
    """
    model = zoo.distilbert("tiny")
    feeds = zoo.sample_inputs(model, batch=6, sequence=16)
    compiled = crowdgraph.compile(model, partitions=4, input_shapes={k: (2, 16) for k in feeds})
    names = {p.sha256: p.name for p in compiled.partitions}
    query = f"memory=600&store={store}"
    with TcpExecutor(web=True) as ex:
        page, state = join(browser, ex, query)
        assert state["cache"] == {"kind": store, "entries": 0, "bytes": 0, "bound": state["cache"]["bound"]}
        compiled.run(feeds, executor=ex, microbatch=2, mode="barrier", timeout=RUN_TIMEOUT)
        first = compiled.last_report
        assert sorted(ld.partition for ld in first.loads if not ld.from_cache) == sorted(names.values())

        before = state["workerId"]
        state = reload(page, ex, query)
        assert before not in ex.coordinator.workers
        assert state["cache"]["entries"] == len(names) and state["cache"]["kind"] == store
        assert state["cache"]["bytes"] == sum(len(p.model_bytes) for p in compiled.partitions)
        assert sorted(ex.coordinator.workers[state["workerId"]].hello["cached"]) == sorted(names)
        changed = None
        if store == "opfs":
            changed = compiled.partitions[1]
            assert page.eval(CORRUPT_OPFS_ENTRY % changed.sha256) == len(changed.model_bytes)

        got = compiled.run(feeds, executor=ex, microbatch=2, mode="barrier", timeout=RUN_TIMEOUT)
        report = compiled.last_report
        assert page.state()["cache"]["entries"] == len(names)  # the changed entry was stored again

        # Opened again with a smaller bound, the page keeps the most recently used that fit in it.
        bound = 400_000
        trimmed = reload(page, ex, query + f"&cache={bound / 1e6}")
        recent, size = [], 0
        for part in reversed(compiled.partitions):  # the second run used them in plan order
            if size + len(part.model_bytes) > bound:
                break
            recent.append(part.sha256)
            size += len(part.model_bytes)
        assert sorted(ex.coordinator.workers[trimmed["workerId"]].hello["cached"]) == sorted(recent)
        assert trimmed["cache"]["bytes"] == size <= bound and trimmed["cache"]["bound"] == bound
        page.close()
    assert_matches(got, oracle(model, feeds))
    assert {t.worker for t in report.tasks} == {state["workerId"]}
    assert report.tier_counts.get(2) == len(names) and not {3, 4} & set(report.tier_counts), report.tier_counts
    sent = [ld.partition for ld in report.loads if not ld.from_cache]
    assert sent == ([] if changed is None else [changed.name])
    assert sorted(ld.partition for ld in report.loads if ld.from_cache) == sorted(
        p.name for p in compiled.partitions if p is not changed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(st.tuples(st.integers(1, 50), st.integers(0, 20)), max_size=10),
       incoming=st.integers(0, 60), bound=st.integers(0, 200))
def test_the_page_cache_evicts_the_least_recently_used_and_no_more(crowd, entries, incoming, bound):
    """cache.mjs's eviction rule, run in the page: room for ``incoming``, oldest first, nothing extra."""
    ex, pages, browser_ids = crowd
    plain = [{"sha": f"{n:064x}", "size": size, "used": used} for n, (size, used) in enumerate(entries)]
    evicted = pages[0].eval(f"import('/cache.mjs').then((m) => m.evictions({json.dumps(plain)}, {incoming}, {bound}))")
    kept = [e for e in plain if e["sha"] not in evicted]
    out = [e for e in plain if e["sha"] in evicted]
    assert len(out) == len(evicted)
    kept_bytes = sum(e["size"] for e in kept)
    assert kept_bytes + incoming <= bound or not kept  # room made, unless nothing is left to remove
    assert all(o["used"] <= k["used"] for o in out for k in kept)  # least recently used first
    if out:  # and no more than needed: keeping the last one evicted would not have fit
        last = next(e for e in plain if e["sha"] == evicted[-1])
        assert kept_bytes + last["size"] + incoming > bound


def test_a_frozen_page_is_lost_and_rejoins_as_a_new_worker(browser):
    """A background tab / a screen turned off: no heartbeat; when it comes back it rejoins."""
    with TcpExecutor(web=True, heartbeat=0.5) as ex:
        page, state = join(browser, ex)
        first = state["workerId"]
        page.send("Page.setWebLifecycleState", {"state": "frozen"})
        t0 = time.monotonic()
        while first in ex.coordinator.workers and time.monotonic() - t0 < 15:
            time.sleep(0.05)
        assert first not in ex.coordinator.workers, "the coordinator did not notice the silent page"
        page.send("Page.setWebLifecycleState", {"state": "active"})
        page.wait_for(lambda s: s.get("status") == "connected" and s.get("workerId") not in (None, first),
                      30, "the page to rejoin")
        # Under load a 0.5 s heartbeat can lose the page again before this looks: any new id counts.
        t0 = time.monotonic()
        while not set(ex.coordinator.workers) - {first} and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        assert set(ex.coordinator.workers) - {first}, "the page rejoined but the coordinator does not hold it"
        page.close()


def test_a_wrong_token_is_refused(browser):
    with TcpExecutor(web=True) as ex:
        page = browser.open(page_url(ex, token="not-the-token"))
        state = page.wait_for(lambda s: s.get("status") == "refused", 30, "the refusal")
        assert "authentication failed" in state["detail"]
        assert not ex.coordinator.workers
        page.close()


def test_a_websocket_from_another_origin_is_refused():
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.websocket import websocket_connect

    with TcpExecutor(web=True) as ex:
        ws_url = f"ws://127.0.0.1:{ex.coordinator.web_port}/ws"

        async def attempt(origin: str):
            conn = await websocket_connect(HTTPRequest(ws_url, headers={"Origin": origin}))
            conn.close()

        with pytest.raises(HTTPClientError) as info:
            asyncio.run(attempt("http://evil.example:8787"))
        assert info.value.code == 403
        asyncio.run(attempt(f"http://127.0.0.1:{ex.coordinator.web_port}"))  # the page's own origin is fine


def test_the_page_and_runtime_are_served_locally_with_isolation_headers():
    with TcpExecutor(web=True) as ex:
        base = f"http://127.0.0.1:{ex.coordinator.web_port}"
        expect = {"/": "text/html", "/worker.mjs": "text/javascript", "/compute.mjs": "text/javascript",
                  "/ort/ort.wasm.min.mjs": "text/javascript", "/ort/ort-wasm-simd-threaded.wasm": "application/wasm"}
        for path, mime in expect.items():
            req = urllib.request.Request(base + path, headers={"Accept-Encoding": "gzip"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.headers["Content-Type"].startswith(mime), (path, r.headers["Content-Type"])
                assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
                assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
                assert r.headers["Content-Encoding"] == "gzip"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/ort/../../../package.json", timeout=10)
        assert set(ORT_FILES) >= {"ort-wasm-simd-threaded.wasm"}


def test_the_worker_page_renders_what_the_protocol_says(crowd, tmp_path):
    ex, pages, browser_ids = crowd
    page = pages[1]
    state = page.state()
    text = page.text()
    assert "connected" in text and state["workerId"] in text
    assert "memory budget" in text and "tasks done" in text and "partition" in text
    assert state["workerId"] in ex.coordinator.workers
    assert ex.coordinator.workers[state["workerId"]].memory == state["announced"]
    assert ex.coordinator.workers[state["workerId"]].hello["platform"] == "browser-wasm"
    # The token was read once, then scrubbed from the URL; nothing keeps it but the page's own script.
    assert page.eval("location.href").endswith("/?memory=600") and page.eval("sessionStorage.length") == 0
    shot = page.screenshot(tmp_path / "worker-page.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 2000


def test_crowdgraph_serve_web_prints_the_join_url_and_a_qr_code_and_drives_pages(browser, tmp_path, monkeypatch,
                                                                                   tcp_helpers):
    import subprocess
    import sys

    token = "serve-web-token-0123456789"
    (tmp_path / "token").write_text(token)
    serve = subprocess.Popen([sys.executable, "-m", "crowdgraph.cli", "serve", "--listen", "127.0.0.1:0", "--web",
                              "--token-file", str(tmp_path / "token")], env=tcp_helpers.child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    worker = None
    try:
        lines = [serve.stdout.readline() for _ in range(4)]
        url = lines[0].split()[-1]
        join_line = next(line for line in lines if "phones join at" in line)
        join_url = join_line.split()[-1]
        assert join_url.startswith("http://127.0.0.1:") and join_url.endswith(f"#token={token}")
        qr = [serve.stdout.readline() for _ in range(3)]
        assert any("█" in line or "▀" in line for line in qr), qr
        worker = subprocess.Popen([sys.executable, "-m", "crowdgraph_tcp.worker", url, "--token-file",
                                   str(tmp_path / "token"), "--memory", "24MB", "--threads", "1",
                                   "--cache-dir", str(tmp_path / "cache")], env=tcp_helpers.child_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        page = browser.open(join_url.replace("/#", "/?memory=600#"))
        page.wait_for(lambda s: s.get("status") == "connected", 60, "the page to join")
        monkeypatch.setenv("CROWDGRAPH_TOKEN", token)
        model, feeds, compiled = tiny_case()
        # What executor=url opens, told to wait (60 s at most) until the Python worker has joined too.
        with TcpExecutor.from_url(url, min_workers=2, join_timeout=60) as driver:
            got = compiled.run(feeds, executor=driver, microbatch=2, timeout=RUN_TIMEOUT)
            report = compiled.last_report
        assert_matches(got, oracle(model, feeds))
        assert len({t.worker for t in report.tasks}) == 2
        page.close()
    finally:
        if worker is not None:
            tcp_helpers.stop_process(worker)
        tcp_helpers.stop_process(serve)
