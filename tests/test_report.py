"""The run report: its text, its timeline picture and its web page read at a glance, at 4 and at 50 workers.

Set ``CROWDGRAPH_UPDATE_DOCS=1`` to have these tests write the pictures
shown in docs/report.md (docs/timeline.png, docs/timeline-50.png,
docs/report-html.png) instead of temporary copies.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import shutil
import subprocess
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crowdgraph
from crowdgraph import zoo
from crowdgraph.report import ROW_BANDS, RunReport, TaskRecord, timeline_rows

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def compiled():
    return crowdgraph.compile(zoo.distilbert("tiny"), partitions=6, input_shapes={"input_ids": (1, 16)})


def simulated(compiled, workers: int, microbatch: int) -> RunReport:
    crowd = [crowdgraph.WorkerInfo(f"phone{k:02d}", memory="64MB", speed=1 + k % 3) for k in range(workers)]
    return crowdgraph.simulate(compiled, crowd, (16, 16), microbatch=microbatch)


@pytest.fixture(scope="module", params=[4, 50], ids=["4-workers", "50-workers"])
def report(request, compiled):
    return simulated(compiled, request.param, microbatch=1)


def picture_path(tmp_path, name: str) -> pathlib.Path:
    return DOCS / name if os.environ.get("CROWDGRAPH_UPDATE_DOCS") else tmp_path / name


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.integers(0, 7), st.floats(0, 10)), max_size=40),
       st.integers(1, 8))
def test_rows_are_every_worker_once_in_pipeline_order(tasks, workers):
    r = RunReport("threads", "streaming", 1, 12)
    for w in range(workers):
        r.add_worker(f"w{w}", 100, 1.0)
    for part, worker, start in tasks:
        if worker < workers:
            r.record_task(TaskRecord(f"p{part}", 0, f"w{worker}", 1, start, start + 1), None, None)
    rows = timeline_rows(r)
    assert sorted(row.worker for row in rows) == sorted(r.workers)
    order = [int(row.group[1:]) if row.group != "idle" else 99 for row in rows]
    assert order == sorted(order)
    for row in rows:
        ran = Counter(t.partition for t in r.tasks if t.worker == row.worker)
        assert row.group == "idle" if not ran else ran[row.group] == max(ran.values())

def test_text_says_its_units_once(report):
    text = str(report)
    assert text.count("sizes in decimal units: 1 MB = 1,000,000 bytes") == 1
    assert "MiB" not in text and "64.0 MB" in text  # the budget of every worker, in the same unit


def test_timeline_picture(report, tmp_path):
    from PIL import Image

    path = picture_path(tmp_path, f"timeline{'' if len(report.workers) == 4 else '-50'}.png")
    report.plot_timeline(path)
    with Image.open(path) as image:
        width, height = image.size
    assert width == 1210 and 200 < height < 1400  # 50 workers still fit a screen: idle ones share a row


def test_html_has_a_row_per_worker_and_a_tooltip_per_bar(report):
    page = report.to_html()
    assert page.count('class="worker-row"') == len(report.workers)
    tooltips = re.findall(r'<rect class="task"[^>]*><title>([^<]*)</title>', page)
    assert len(tooltips) == len(report.tasks)
    first = report.tasks[0]
    assert any(tip.startswith(f"{first.partition} micro-batch {first.microbatch} on {first.worker} (tier ")
               for tip in tooltips)
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing loads from the network


def screenshot(html: pathlib.Path, png: pathlib.Path, height: int) -> None:
    """Headless Chromium's picture of ``html`` (a local file; nothing else is opened)."""
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    if chromium is None:
        pytest.skip("chromium not found: `make test` installs it when run as root with apt-get")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--no-first-run", "--disable-extensions", f"--window-size=1200,{height}",
                    f"--screenshot={png}", html.as_uri()], check=True, capture_output=True, timeout=90)


def visible_rows(png: pathlib.Path, x: int) -> int:
    """Row bands of the timeline down pixel column ``x``: each row is one run of its band colour."""
    from PIL import Image

    bands = {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in ROW_BANDS}
    with Image.open(png) as image:
        column = [image.convert("RGB").getpixel((x, y)) for y in range(image.size[1])]
    runs, previous, length = 0, None, 0
    for colour in column + [None]:
        if colour == previous:
            length += 1
            continue
        if previous in bands and length >= 4:
            runs += 1
        previous, length = colour, 1
    return runs


def test_html_report_in_chromium_shows_every_worker_row(report, tmp_path):
    html = tmp_path / "report.html"
    report.to_html(html)
    png = picture_path(tmp_path, "report-html.png" if len(report.workers) == 4 else "report-html-50.png")
    screenshot(html, png, height=1200 if len(report.workers) > 12 else 420)
    assert visible_rows(png, x=19) == len(report.workers)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_view_redraws_in_place_on_a_terminal(compiled):
    from crowdgraph.report import LiveView
    from crowdgraph.threads import ThreadExecutor

    batch = zoo.sample_inputs(zoo.distilbert("tiny"), batch=4, sequence=16)
    screen = Terminal()
    with ThreadExecutor(workers=3) as threads:
        view = LiveView(threads, total_tasks=4 * len(compiled.partitions), stream=screen, interval=0.0)
        compiled.run(batch, executor=view, microbatch=1)
        report = compiled.last_report
        view.finish()
    frames = screen.getvalue().split("\x1b[4F")  # each redraw moves up over the 1 + 3 lines drawn before
    assert len(frames) > 2
    last = [line.removeprefix("\x1b[2K") for line in frames[-1].splitlines()]
    assert last[0].startswith(f"{len(report.tasks)}/{len(report.tasks)} tasks")
    for line in last[1:]:
        worker, _, tasks, _, _, _, tiers, *_ = line.split()
        assert int(tasks) == report.workers[worker].tasks
        assert tiers == "/".join(str(report.workers[worker].tiers.get(t, 0)) for t in (1, 2, 3, 4))
