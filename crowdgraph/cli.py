"""The ``crowdgraph`` command line: inspect, compile, run, demo.

Commands that executor plug-ins add (``crowdgraph serve`` from
crowdgraph-tcp) come in through the entry-point group
``crowdgraph.commands``: each entry is a function ``register(subparsers)``
that adds its sub-command and sets ``func`` on it.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from typing import Any, Sequence

from .errors import CrowdgraphError, InputError

#: Shapes the embedded model is inspected and run at when none are given.
DEFAULT_BATCH, DEFAULT_SEQUENCE = 1, 128


def parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]] | None:
    """Parse ``["input_ids=8x128", ...]`` into a shape mapping.

    >>> parse_shapes(["input_ids=8x128", "mask=8x128"])
    {'input_ids': (8, 128), 'mask': (8, 128)}
    """
    if not items:
        return None
    shapes = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise InputError(f"cannot read shape {item!r}; write NAME=DxDxD, e.g. input_ids=1x128") from None
        if not name:
            raise InputError(f"cannot read shape {item!r}; write NAME=DxDxD, e.g. input_ids=1x128")
    return shapes


def _model_and_shapes(args: argparse.Namespace) -> tuple[Any, dict[str, tuple[int, ...]] | None]:
    shapes = parse_shapes(args.shape)
    if args.model:
        return args.model, shapes
    from . import zoo

    model = zoo.distilbert(args.size)
    if shapes is None:
        shapes = {"input_ids": (DEFAULT_BATCH, DEFAULT_SEQUENCE), "attention_mask": (DEFAULT_BATCH, DEFAULT_SEQUENCE)}
    return model, shapes


def _compile(args: argparse.Namespace):
    from .compiled import compile

    model, shapes = _model_and_shapes(args)
    if args.partitions:
        return compile(model, partitions=args.partitions, input_shapes=shapes)
    return compile(model, args.budget, input_shapes=shapes)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the partition table."""
    print(_compile(args).table())
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Write a plan folder."""
    compiled = _compile(args)
    print(compiled.table())
    path = compiled.save(args.output)
    print(f"plan written to {path}")
    return 0


def sample_batch(compiled: Any, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, Any]:
    """Inputs of the given shapes: normal floats, ones for integers, True for bools.

    Ones are valid token ids and attention masks alike, so language models
    run on them as they are.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    batch = {}
    for spec in compiled.inputs:
        shape = shapes.get(spec.name) or compiled.input_shapes[spec.name]
        if np.issubdtype(spec.dtype, np.floating):
            batch[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            batch[spec.name] = np.ones(shape, dtype=spec.dtype)
    return batch


def cmd_run(args: argparse.Namespace) -> int:
    """Run a model on a crowd of thread workers (or any executor) and print the report."""
    import numpy as np

    from .threads import ThreadExecutor

    compiled = _compile(args)
    if args.inputs:
        with np.load(args.inputs) as data:
            batch = {k: data[k] for k in data.files}
    else:
        batch = sample_batch(compiled, parse_shapes(args.batch_shape) or {}, args.seed)
    executor: Any = args.executor or ThreadExecutor(workers=args.workers)
    outputs, report = compiled.run(batch, executor=executor, microbatch=args.microbatch or "auto", mode=args.mode,
                                   report=True, progress=sys.stderr.isatty(), seed=args.seed)
    print(compiled.table())
    print()
    print(report)
    for name, value in outputs.items():
        print(f"output {name}: shape {list(value.shape)}, dtype {value.dtype}")
    if args.timeline:
        report.plot_timeline(args.timeline)
        print(f"timeline written to {args.timeline}")
    if args.json:
        report.to_json(args.json)
        print(f"report written to {args.json}")
    if args.output:
        np.savez(args.output, **outputs)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded DistilBERT on four thread workers, checked against one whole session."""
    import numpy as np

    from . import zoo
    from .compiled import compile
    from .runtime import open_session, run_session
    from .threads import ThreadExecutor

    model = zoo.distilbert(args.size)
    batch = zoo.sample_inputs(model, batch=args.batch, sequence=args.sequence)
    micro = {k: v[: args.microbatch] for k, v in batch.items()}
    compiled = compile(model, args.budget, sample=micro)
    print(f"DistilBERT ({zoo.parameter_count(model) / 1e6:.1f}M parameters) cut for a {args.budget} budget:")
    print(compiled.table())
    print()
    with ThreadExecutor(workers=args.workers) as executor:
        outputs, report = compiled.run(batch, executor=executor, microbatch=args.microbatch, mode=args.mode,
                                       report=True, progress=sys.stderr.isatty())
    print(report)
    expected = run_session(open_session(model.SerializeToString()), batch)
    diff = float(np.max(np.abs(outputs["logits"] - expected["logits"])))
    print(f"\nlogits {list(outputs['logits'].shape)}; max abs difference to one whole-model session: {diff:.2e}")
    report.plot_timeline(args.timeline)
    print(f"timeline written to {args.timeline}")
    return 0 if diff <= 1e-4 else 1


def _add_model_args(parser: argparse.ArgumentParser, budget: str = "128MB") -> None:
    parser.add_argument("model", nargs="?", help="path of an .onnx model (default: the embedded DistilBERT)")
    parser.add_argument("--budget", default=budget, help=f"memory budget per worker (default {budget})")
    parser.add_argument("--partitions", type=int, help="cut into at most this many partitions instead")
    parser.add_argument("--shape", action="append", metavar="NAME=DxD",
                        help="input shape to estimate at, e.g. input_ids=1x128 (repeatable)")
    parser.add_argument("--size", default="full", choices=["full", "tiny"],
                        help="size of the embedded model when no model is given")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with plug-in commands registered."""
    parser = argparse.ArgumentParser(prog="crowdgraph", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print how a model is partitioned")
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("compile", help="partition a model and write a plan folder")
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="plan folder to write")
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("run", help="run a model across a crowd and print the report")
    _add_model_args(p)
    p.add_argument("--workers", type=int, default=4, help="number of thread workers (default 4)")
    p.add_argument("--executor", help="an executor name or URL instead of thread workers (tcp://host:port)")
    p.add_argument("--microbatch", type=int,
                   help="rows per micro-batch (default: the largest that fits the budget, the whole batch if it fits)")
    p.add_argument("--mode", default="streaming", choices=["streaming", "barrier"])
    p.add_argument("--batch-shape", action="append", metavar="NAME=DxD",
                   help="shape of a generated input batch (default: the compiled shapes)")
    p.add_argument("--inputs", help="an .npz file with the input batch")
    p.add_argument("--output", help="write the outputs to this .npz file")
    p.add_argument("--timeline", help="write the timeline picture (PNG) here")
    p.add_argument("--json", help="write the run report as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo", help="run the embedded DistilBERT on four thread workers")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--budget", default="128MB")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sequence", type=int, default=128)
    p.add_argument("--microbatch", type=int, default=4)
    p.add_argument("--mode", default="streaming", choices=["streaming", "barrier"])
    p.add_argument("--timeline", default="timeline.png")
    p.set_defaults(func=cmd_demo)
    for ep in entry_points(group="crowdgraph.commands"):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crowdgraph`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CrowdgraphError as exc:
        print(f"crowdgraph: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
