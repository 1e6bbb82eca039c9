"""Run crowdgraph's benchmarks: ``python -m benchmarks [--quick] [--only NAME ...] [--out DIR]``.

Each benchmark prints its tables and writes ``<out>/<name>.json`` (and a
PNG where a picture helps); ``summary.json`` gathers the machine, every
target's PASS/MISS and the time each benchmark took.  ``--quick`` runs a
small subset in a few minutes (a smoke test: its numbers mean little).
A benchmark that fails is reported and the others still run; the exit
status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import time
import traceback
from typing import Any

from . import common

#: Module names, in the order they run.
BENCHMARKS = ("scale", "crowd", "transport", "streaming", "overhead", "memory", "estimate", "generate", "audit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast subset (what CI runs)")
    parser.add_argument("--only", action="append", metavar="NAME", choices=BENCHMARKS,
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help=f"folder for JSON/PNG results (default {common.RESULTS}, "
                             f"{common.RESULTS / 'quick'} with --quick)")
    args = parser.parse_args(argv)
    out = args.out or (common.RESULTS / "quick" if args.quick else common.RESULTS)
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    machine = common.machine()
    common.show(f"crowdgraph benchmarks{' (quick)' if args.quick else ''} on {common.machine_line(machine)}")
    common.show(f"results in {out}")
    began = time.perf_counter()
    summary: dict[str, Any] = {"quick": args.quick, "machine": machine, "benchmarks": {}, "targets": []}
    failed = []
    for name in names:
        common.show(f"\n=== {name} ===")
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            data = module.run(args.quick, out)
        except Exception:  # one broken benchmark must not hide the others
            text = traceback.format_exc()
            common.show(text)
            failed.append(name)
            data = common.result(name, args.quick, seconds=time.perf_counter() - start, error=text)
        common.write_json(out, name, data)
        common.print_targets(data)
        summary["benchmarks"][name] = {"seconds": round(time.perf_counter() - start, 2),
                                       "skipped": data.get("skipped"), "error": data.get("error"),
                                       "loadavg_at_end": common.loadavg()}
        summary["targets"] += data["targets"]
    summary["seconds"] = time.perf_counter() - began
    common.write_json(out, "summary", summary)

    common.show(f"\n=== summary ({summary['seconds']:.0f} s) ===")
    for name, info in summary["benchmarks"].items():
        state = "FAILED" if info["error"] else (info["skipped"] or "ok")
        load = "/".join(f"{x:g}" for x in info["loadavg_at_end"] or [])
        common.show(f"  {name:10} {info['seconds']:7.1f} s  {state:8} load average 1/5/15 min at its end: {load}")
    for t in summary["targets"]:
        common.show("  " + t["line"])
    passed = sum(t["passed"] is True for t in summary["targets"])
    missed = sum(t["passed"] is False for t in summary["targets"])
    common.show(f"{passed} targets met, {missed} missed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
