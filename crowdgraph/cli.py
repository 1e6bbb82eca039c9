"""The ``crowdgraph`` command line: inspect, compile, run, generate, demo.

Commands that executor plug-ins add (``crowdgraph serve`` from
crowdgraph-tcp) come in through the entry-point group
``crowdgraph.commands``: each entry is a function ``register(subparsers)``
that adds its sub-command and sets ``func`` on it.

Every mistake on the command line ends in one line on stderr,
``crowdgraph: error: ...``, and exit code 2; Ctrl-C ends in one line and
exit code 130.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import zipfile
from importlib.metadata import entry_points
from typing import Any, Mapping, NoReturn, Sequence

from . import __version__
from .errors import CrowdgraphError, InputError
from .units import format_bytes, parse_bytes

#: Shapes the embedded model is inspected and run at when none are given.
DEFAULT_BATCH, DEFAULT_SEQUENCE = 1, 128
DEFAULT_BUDGET = "128MB"
DEFAULT_DECODER_BUDGET, DEFAULT_MAX_LENGTH = "32MB", 128
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130

_PLOT_HINT = "pip install 'crowdgraph[plot]'"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``crowdgraph: error: ...``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog.split()[0]}: error: {message}; see {self.prog} --help\n")


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
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not name or not shape or min(shape) < 1:
            raise InputError(f"cannot read shape {item!r}; write NAME=DxDxD with positive dims, "
                             "e.g. input_ids=1x128")
        shapes[name] = shape
    return shapes


def byte_size(text: str) -> int:
    """A byte size such as ``--budget 48MB``, or argparse's one-line error."""
    try:
        return parse_bytes(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """A count such as ``--workers 4``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def positive_float(text: str) -> float:
    """A duration such as ``--heartbeat 5``: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
    return value


def is_plan_folder(path: str | None) -> bool:
    """Whether ``path`` is a plan folder that ``crowdgraph compile -o`` wrote."""
    from .compiled import PLAN_FILE

    return path is not None and (pathlib.Path(path) / PLAN_FILE).is_file()


def _compile(args: argparse.Namespace) -> Any:
    """The compiled model the arguments name: a plan folder as saved, or a model cut now."""
    from .compiled import compile, load

    shapes = parse_shapes(args.shape)
    if is_plan_folder(args.model):
        given = [flag for flag, value in (("--budget", args.budget), ("--partitions", args.partitions),
                                          ("--shape", args.shape)) if value is not None]
        if given:
            raise InputError(f"{args.model} is a plan folder, which runs as it was compiled; drop "
                             f"{' '.join(given)}, or compile the model again with them")
        return load(args.model)
    if args.partitions is not None and args.budget is not None:
        raise InputError("give --budget or --partitions, not both")
    model: Any = args.model
    if model is None:
        from . import zoo

        model = zoo.distilbert(args.size)
        if shapes is None:
            shapes = {"input_ids": (DEFAULT_BATCH, DEFAULT_SEQUENCE),
                      "attention_mask": (DEFAULT_BATCH, DEFAULT_SEQUENCE)}
    if args.partitions is not None:
        return compile(model, partitions=args.partitions, input_shapes=shapes)
    return compile(model, args.budget if args.budget is not None else DEFAULT_BUDGET, input_shapes=shapes)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the partition table."""
    print(_compile(args).table())
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Write a plan folder."""
    if is_plan_folder(args.model):
        raise InputError(f"{args.model} is already a plan folder; give the .onnx model to compile")
    compiled = _compile(args)
    print(compiled.table())
    path = compiled.save(args.output)
    print(f"plan written to {path}; run it with: crowdgraph run {path}")
    return 0


def sample_batch(compiled: Any, shapes: Mapping[str, tuple[int, ...]], seed: int = 0,
                 rows: int | None = None) -> dict[str, Any]:
    """Inputs of the given shapes: normal floats, ones for integers, True for bools.

    Inputs not in ``shapes`` take the shapes the plan was compiled at,
    with ``rows`` on axis 0 when they are batched (default: the rows of a
    batched input in ``shapes``, so one ``--batch-shape`` is enough).
    Ones are valid token ids and attention masks alike, so language
    models run on them as they are.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    batched = set(compiled.batched_inputs())
    if rows is None:
        rows = next((shapes[name][0] for name in compiled.batched_inputs() if name in shapes), None)
    batch = {}
    for spec in compiled.inputs:
        shape = tuple(shapes.get(spec.name) or compiled.input_shapes[spec.name])
        if rows is not None and spec.name in batched and spec.name not in shapes:
            shape = (rows, *shape[1:])
        if np.issubdtype(spec.dtype, np.floating):
            batch[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            batch[spec.name] = np.ones(shape, dtype=spec.dtype)
    return batch


def read_inputs(path: str) -> dict[str, Any]:
    """The arrays of an ``.npz`` file written by ``numpy.savez``, or an :class:`InputError`."""
    import numpy as np

    hint = "write one with numpy.savez(path, input_ids=..., attention_mask=...)"
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read --inputs {path} ({exc}); {hint}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"--inputs {path} holds one array, not named ones; {hint}")
    try:
        with data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"cannot read --inputs {path} ({exc}); {hint}") from None


def microbatch_shapes(compiled: Any, feeds: Mapping[str, Any], microbatch: int | None) -> dict[str, tuple[int, ...]]:
    """Shapes of the first micro-batch ``run()`` cuts from ``feeds`` (it decides the plan that runs)."""
    batched = set(compiled.batched_inputs())
    shapes = {}
    for name, value in feeds.items():
        shape = tuple(value.shape)
        if name in batched and microbatch is not None:
            shape = (min(microbatch, shape[0]), *shape[1:])
        shapes[name] = shape
    return shapes


def describe_plan_change(compiled: Any, plan: Any) -> str | None:
    """Why ``run()`` runs ``plan`` rather than ``compiled`` (None when it runs ``compiled``)."""
    if plan is compiled:
        return None

    def shapes(model: Any) -> str:
        return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in model.input_shapes.items())

    return (f"re-partitioned: the micro-batches ({shapes(plan)}) are larger than the shapes the plan was "
            f"compiled at ({shapes(compiled)}), so the model was cut again at the micro-batch shapes to keep "
            f"every partition within the budget: {len(plan.partitions)} partitions instead of "
            f"{len(compiled.partitions)}. Compile at the micro-batch shape (--shape) to skip this step.")


def cmd_run(args: argparse.Namespace) -> int:
    """Run a model on a crowd of thread workers (or any executor) and print the report."""
    import numpy as np

    from .executor import resolve_executor
    from .report import LiveView
    from .threads import ThreadExecutor

    if args.inputs and (args.batch is not None or args.batch_shape):
        raise InputError("give --inputs or --batch/--batch-shape, not both: the file fixes the batch")
    if args.timeline:
        _need_matplotlib("--timeline")
    compiled = _compile(args)
    if args.inputs:
        batch = read_inputs(args.inputs)
    else:
        batch = sample_batch(compiled, parse_shapes(args.batch_shape) or {}, args.seed, rows=args.batch)
    feeds = compiled.check_inputs(batch)
    # The micro-batch run() picks by default ("auto"), resolved here so the plan shown is the plan run.
    microbatch = args.microbatch if args.microbatch is not None else compiled._auto_microbatch(feeds)
    plan = compiled.at_shapes(microbatch_shapes(compiled, feeds, microbatch))
    change = describe_plan_change(compiled, plan)
    if change:
        print(change)
        print()
    print(plan.table())
    print()
    count = microbatch_count(compiled, feeds, microbatch)
    if not args.executor:
        _warn_idle_workers(count, len(plan.partitions), args.workers, microbatch)
    executor, owned = resolve_executor(args.executor or ThreadExecutor(workers=args.workers))
    view = LiveView(executor, total_tasks=count * len(plan.partitions)) if args.live else None
    try:
        outputs = compiled.run(feeds, executor=view or executor, microbatch=microbatch, mode=args.mode,
                               progress=sys.stderr.isatty() and not view, seed=args.seed)
    finally:
        if view is not None:
            view.finish()
        if owned or not args.executor:
            executor.close()
    report = compiled.last_report
    print(report)
    for name, value in outputs.items():
        print(f"output {name}: shape {list(value.shape)}, dtype {value.dtype}")
    if args.timeline:
        report.plot_timeline(args.timeline)
        print(f"timeline written to {args.timeline}")
    if args.html:
        report.to_html(args.html)
        print(f"report page written to {args.html}")
    if args.json:
        report.to_json(args.json)
        print(f"report written to {args.json}")
    if args.output:
        np.savez(args.output, **outputs)
    return 0


def parse_token_ids(text: str) -> list[int]:
    """A prompt such as ``--prompt-ids 1,2,3``: token ids separated by commas.

    >>> parse_token_ids("464, 3290,318")
    [464, 3290, 318]
    """
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of token ids such as 1,2,3")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate tokens with a decoder, printing each step's tokens as they come."""
    from .compiled import compile
    from .executor import resolve_executor
    from .threads import ThreadExecutor

    if args.partitions is not None and args.budget is not None:
        raise InputError("give --budget or --partitions, not both")
    model: Any = args.model
    if model is None:
        from . import zoo

        model = zoo.gpt2(args.size)
    budget = None if args.partitions is not None else (args.budget or DEFAULT_DECODER_BUDGET)
    compiled = compile(model, budget, partitions=args.partitions, max_length=args.max_length)
    print(compiled.table())
    print()
    prompts = args.prompt_ids or [[1]]
    executor, owned = resolve_executor(args.executor or ThreadExecutor(workers=args.workers))
    try:
        steps = compiled.generate(prompts, max_new_tokens=args.max_new_tokens, executor=executor, stream=True,
                                  do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, seed=args.seed, eos_token_id=args.eos_id)
        for step in steps:
            print(f"step {step.index:>3}: " + " ".join(f"{t:>6}" for t in step.tokens.tolist()), flush=True)
    finally:
        if owned or not args.executor:
            executor.close()
    print()
    print(compiled.last_report)
    return 0


def microbatch_count(compiled: Any, feeds: Mapping[str, Any], microbatch: int | None) -> int:
    """How many micro-batches ``run()`` cuts ``feeds`` into."""
    batched = compiled.batched_inputs()
    if not batched or microbatch is None:
        return 1
    return -(-feeds[batched[0]].shape[0] // microbatch)


def _warn_idle_workers(count: int, partitions: int, workers: int, microbatch: int | None) -> None:
    """Say so when the batch gives the thread workers fewer tasks at a time than there are workers."""
    if count < workers and partitions < workers:
        print(f"note: {count} micro-batch{'es' if count > 1 else ''} of {partitions} partitions are fewer "
              f"tasks at a time than {workers} workers; give --batch "
              f"{workers * (microbatch or 1)} to keep every worker busy")


def _need_matplotlib(what: str) -> None:
    """Fail before any work when ``what`` needs matplotlib and it is missing."""
    from .errors import MissingExtraError

    if importlib.util.find_spec("matplotlib") is None:
        raise MissingExtraError(f"{what} draws with matplotlib, which is not installed: {_PLOT_HINT}")


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded DistilBERT on four thread workers, checked against one whole session."""
    import numpy as np

    from . import zoo
    from .compiled import compile
    from .errors import MissingExtraError
    from .runtime import open_session, run_session
    from .threads import ThreadExecutor

    model = zoo.distilbert(args.size)
    batch = zoo.sample_inputs(model, batch=args.batch, sequence=args.sequence)
    micro = {k: v[: args.microbatch] for k, v in batch.items()}
    compiled = compile(model, args.budget, sample=micro)
    print(f"DistilBERT ({zoo.parameter_count(model) / 1e6:.1f}M parameters) cut for a {format_bytes(args.budget)} budget:")
    print(compiled.table())
    print()
    with ThreadExecutor(workers=args.workers) as executor:
        outputs = compiled.run(batch, executor=executor, microbatch=args.microbatch, mode=args.mode,
                               progress=sys.stderr.isatty())
    report = compiled.last_report
    print(report)
    expected = run_session(open_session(model.SerializeToString()), batch)
    diff = float(np.max(np.abs(outputs["logits"] - expected["logits"])))
    print(f"\nlogits {list(outputs['logits'].shape)}; max abs difference to one whole-model session: {diff:.2e}")
    try:
        report.plot_timeline(args.timeline)
        print(f"timeline written to {args.timeline}")
    except MissingExtraError:
        print(f"no timeline picture: matplotlib is not installed ({_PLOT_HINT})")
    return 0 if diff <= 1e-4 else 1


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?",
                        help="an .onnx model, or a plan folder written by crowdgraph compile "
                             "(default: the embedded DistilBERT)")
    parser.add_argument("--budget", type=byte_size,
                        help=f"memory budget per worker, e.g. 48MB or 64MiB (default {DEFAULT_BUDGET})")
    parser.add_argument("--partitions", type=positive_int, help="cut into at most this many partitions instead")
    parser.add_argument("--shape", action="append", metavar="NAME=DxD",
                        help="input shape to estimate at, e.g. input_ids=1x128 (repeatable)")
    parser.add_argument("--size", default="full", choices=["full", "tiny"],
                        help="size of the embedded model when no model is given")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with plug-in commands registered."""
    parser = Parser(prog="crowdgraph",
                    description="Cut an ONNX model into partitions that fit a memory budget and run them "
                                "across a crowd of small machines.",
                    epilog="Sizes are printed in decimal units: 1 MB = 1,000,000 bytes.")
    parser.add_argument("--version", action="version", version=f"crowdgraph {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print how a model is partitioned")
    _add_model_args(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("compile", help="partition a model and write a plan folder")
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, help="plan folder to write")
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("run", help="run a model (or a plan folder) across a crowd and print the report")
    _add_model_args(p)
    p.add_argument("--workers", type=positive_int, default=4, help="number of thread workers (default 4)")
    p.add_argument("--executor", help="an executor name or URL instead of thread workers (tcp://host:port)")
    p.add_argument("--batch", type=positive_int, metavar="ROWS",
                   help="rows of the generated batch, for every batched input (default: the compiled shapes)")
    p.add_argument("--microbatch", type=positive_int,
                   help="rows per micro-batch (default: the largest that fits the budget, the whole batch if it fits)")
    p.add_argument("--mode", default="streaming", choices=["streaming", "barrier"])
    p.add_argument("--batch-shape", action="append", metavar="NAME=DxD",
                   help="shape of one generated input, e.g. input_ids=16x64 (repeatable)")
    p.add_argument("--inputs", help="an .npz file with the input batch (numpy.savez)")
    p.add_argument("--output", help="write the outputs to this .npz file")
    p.add_argument("--timeline", help="write the timeline picture (PNG) here")
    p.add_argument("--html", help="write the report as a web page (timeline included) here")
    p.add_argument("--json", help="write the run report as JSON here")
    p.add_argument("--live", action="store_true",
                   help="show each worker's progress (tasks, loads, bytes) as the run goes, instead of the bar")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("generate", help="generate tokens with a decoder model across a crowd")
    p.add_argument("model", nargs="?", help="a decoder .onnx model (default: the embedded GPT-2-shaped decoder)")
    p.add_argument("--budget", type=byte_size,
                   help=f"memory budget per worker, cache included (default {DEFAULT_DECODER_BUDGET})")
    p.add_argument("--partitions", type=positive_int, help="cut into at most this many partitions instead")
    p.add_argument("--max-length", type=positive_int, default=DEFAULT_MAX_LENGTH,
                   help=f"longest prompt plus new tokens the plan fits (default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--prompt-ids", type=parse_token_ids, action="append", metavar="ID,ID,...",
                   help="a prompt as token ids, e.g. 1,2,3 (repeatable: one sequence each; default 1)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16)
    p.add_argument("--eos-id", type=int, action="append", help="a token id that ends a sequence (repeatable)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0)
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--top-p", type=positive_float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=positive_int, default=4, help="number of thread workers (default 4)")
    p.add_argument("--executor", help="an executor name or URL instead of thread workers (tcp://host:port)")
    p.add_argument("--size", default="small", choices=["full", "small", "tiny"],
                   help="size of the embedded decoder when no model is given")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("demo", help="run the embedded DistilBERT on four thread workers")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    p.add_argument("--budget", type=byte_size, default=DEFAULT_BUDGET)
    p.add_argument("--workers", type=positive_int, default=4)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--sequence", type=positive_int, default=128)
    p.add_argument("--microbatch", type=positive_int, default=4)
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
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("crowdgraph: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
