"""Watch a run worker by worker as it goes, then open its report in a browser.

The live view redraws one line per worker on the terminal (tasks, loads,
bytes); the report page (report.html) holds the timeline with a tooltip
on every bar and the per-worker table, and needs no extra package.

Run it: ``python examples/live_report.py`` (writes report.html here)
"""

from __future__ import annotations

import numpy as np

import crowdgraph
from crowdgraph import ThreadExecutor, zoo
from crowdgraph.report import LiveView
from crowdgraph.runtime import open_session, run_session


def main() -> None:
    model = zoo.distilbert("tiny")
    batch = zoo.sample_inputs(model, batch=16, sequence=32)
    compiled = crowdgraph.compile(model, partitions=4, sample={k: v[:2] for k, v in batch.items()})
    with ThreadExecutor(workers=4) as threads:
        view = LiveView(threads, total_tasks=len(compiled.partitions) * 8)
        outputs = compiled.run(batch, executor=view, microbatch=2)
        report = compiled.last_report
        view.finish()
    expected = run_session(open_session(model.SerializeToString()), batch)
    print(f"max abs difference to the whole model: {np.max(np.abs(outputs['logits'] - expected['logits'])):.2e}")
    report.to_html("report.html")
    print(f"report page with {len(report.workers)} worker rows written to report.html")


if __name__ == "__main__":
    main()
