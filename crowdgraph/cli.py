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
