"""TcpExecutor: the crowd is whatever workers connect to a coordinator in this process.

The driver thread calls :meth:`TcpExecutor.load`, :meth:`~TcpExecutor.run`
and :meth:`~TcpExecutor.unload`; each encodes its frame right there (with
the codec agreed with that worker) and hands it to the coordinator's IOLoop
thread, which sends it and matches the worker's answer to it.  Answers
become :class:`~crowdgraph.executor.Reporter` notices on the IOLoop thread.

Tensors between partitions go from worker to worker where they can: a
worker with a peer port holds the outputs other partitions read
(:class:`~crowdgraph_tcp.bridge.HeldOutput` handles on this side), and the
worker that runs a reader fetches them from it, through the coordinator
only where the two cannot reach each other (``direct=`` below).

``TcpExecutor.local(workers=5)`` also starts the workers, as
``crowdgraph-worker`` processes on this machine: the same agent a phone
runs, over real sockets on 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Mapping, Sequence

import numpy as np

from crowdgraph import wire
from crowdgraph.errors import ExecutionError, InputError
from crowdgraph.executor import Executor, Job, Reporter
from crowdgraph import Partition
from crowdgraph.runtime import TaskState
from crowdgraph.schedule import TaskKey, WorkerInfo
from crowdgraph.units import parse_bytes
from crowdgraph.wire import Message

from .bridge import Action, DriverBridge, HeldOutput, Holding, lossy_option
from .peers import fetched_problem
from .common import DEFAULT_HEARTBEAT, parse_listen, read_token, server_ssl_context, wait_for_workers
from .coordinator import QUARANTINE_SECONDS, Coordinator, Listener, Peer

__all__ = ["TcpExecutor"]


class _ExecutorListener(Listener):
    """Coordinator events -> reporter notices through the executor's bridge (IOLoop thread)."""

    def __init__(self, executor: "TcpExecutor"):
        self.executor = executor

    def worker_joined(self, worker: Peer) -> None:
        ex = self.executor
        with ex._changed:
            ex._changed.notify_all()
        if ex.bridge.reporter is not None:
            ex.bridge.reporter.worker_joined(ex.bridge.info(ex._holding(worker)))

    def worker_lost(self, worker: Peer, reason: str) -> None:
        ex = self.executor
        with ex._changed:
            ex._changed.notify_all()
        held = ex.bridge.lost(worker.id)
        if ex.bridge.reporter is not None:
            ex.bridge.reporter.worker_lost(worker.id, reason)
            if held:  # outputs it held for other tasks: computed again
                ex.bridge.reporter.results_lost(held)

    def fetched_problem(self, holder: str, message: Message) -> str | None:
        return self.executor.bridge.fetched_problem(holder, message)

    def reply(self, worker: Peer, action: Action | None, message: Message, size: int, received: float) -> None:
        if action is None:
            return
        ex = self.executor
        problem = ex.bridge.bad_result(worker.id, action, message)
        holder = message.header.get("holder") if message.type == wire.FAILED else None
        if problem is None and holder is not None and holder in ex.coordinator.workers:
            # Fetching through the coordinator fails only when the holder is gone (or, answering
            # with an error, was dropped for it): a holder still here says the reader lies.
            problem = f"worker {worker.id} said it could not fetch inputs from {holder}, which holds them"
        if problem is not None:  # its tasks are placed again once it is lost
            ex.coordinator.drop(worker, problem)
            return
        resend = ex.bridge.answered(worker.id, action, message, size, received)
        if resend is not None:  # the worker's cache lost it: the bytes go ahead of what waits
            ex._submit_now(worker.id, resend)
        while ex.bridge.pending_drops:
            ex._submit_now(*ex.bridge.pending_drops.pop())


class TcpExecutor(Executor):
    """A coordinator in this process; the workers connect to it over TCP.

    Parameters
    ----------
    listen:
        ``HOST:PORT`` to listen on; loopback and a free port by default.
        Anything but loopback exposes the coordinator to a network: use a
        long random token, and TLS (``certfile``) on networks you do not own.
    token:
        The shared secret workers must know (str or bytes); by default
        ``$CROWDGRAPH_TOKEN``, else a random one (see :attr:`token`).
    min_workers:
        :meth:`start` waits until this many workers joined ...
    join_timeout:
        ... for at most this many seconds, then raises ExecutionError.
    heartbeat:
        Seconds between heartbeats; a worker silent for 3 of them is lost.
    lossy:
        ``"fp16"`` or ``"int8"``: send float32 tensors (RUN inputs, RESULT
        outputs) in that lossy encoding to workers that agreed it in the
        handshake; the others, browser pages among them, stay exact.  Fewer
        bytes, outputs no longer equal to the model's: give ``max_error=``
        to :meth:`~crowdgraph.CompiledModel.run` to measure the error and
        bound it (docs/tcp.md).  None (the default) is exact.
    certfile, keyfile:
        Serve TLS with this certificate (workers then connect to ``tls://``).
    web:
        Also serve the browser worker page (docs/browser.md): phones (and
        tests) open :attr:`join_url` and join as workers over WebSocket.
    web_port:
        Port of the page (HTTP, or HTTPS with ``certfile``); by default the
        TCP port + 1, or a free port when the TCP port is 0.
    quarantine_seconds:
        How long a worker that a run's spot checks quarantined
        (``run(..., audit=...)``, docs/audit.md) is refused under its name.
    prefetch:
        Stream each worker that takes it (``crowdgraph-worker`` does, the
        browser page does not) the partition it is expected to load next,
        into its disk cache while it computes, so that its load reads it
        from there (tier 2); memory holds only what is loaded.  Off by
        default; see docs/tcp.md, "Weights ahead of need".
    direct:
        Workers with a peer port (``crowdgraph-worker`` has one unless
        ``--peer-listen off``) hold the outputs that other partitions read,
        within their budget, and the workers running those readers fetch
        them straight from them: a tensor between partitions crosses the
        coordinator not at all (docs/tcp.md, "Worker to worker").  On by
        default; False sends every tensor through the coordinator.

    Attributes
    ----------
    processes:
        For :meth:`local` crowds: worker id -> its ``subprocess.Popen``.
    """

    name = "tcp"

    def __init__(self, listen: str = "127.0.0.1:0", token: str | bytes | None = None, *,
                 min_workers: int = 1, join_timeout: float = 60.0, heartbeat: float = DEFAULT_HEARTBEAT,
                 certfile: str | os.PathLike | None = None, keyfile: str | os.PathLike | None = None,
                 handshake_timeout: float = wire.HANDSHAKE_TIMEOUT, lossy: str | None = None,
                 max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
                 web: bool = False, web_port: int | None = None,
                 quarantine_seconds: float = QUARANTINE_SECONDS, prefetch: bool = False, direct: bool = True):
        host, port = parse_listen(listen)
        if web and web_port is None:
            web_port = port + 1 if port else 0
        self.token: bytes = read_token(token) or secrets.token_hex(32).encode("ascii")
        self.min_workers = int(min_workers)
        self.join_timeout = float(join_timeout)
        #: The lossy wire encoding runs ask for (None: exact); see ``lossy`` above.
        self.lossy = lossy_option(lossy)
        #: Whether workers that take STORE get partitions ahead of need (``prefetch`` above).
        self.prefetch = bool(prefetch)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.bridge = DriverBridge(direct=direct)
        self._encoded: dict[tuple[str, str, int, bool], list[Any]] = {}
        self._encoded_lock = threading.Lock()
        self._changed = threading.Condition()
        self._spawned: list[tuple[str, subprocess.Popen[bytes], Any]] = []
        self._tmp: str | None = None
        self._closed = False
        ssl_options = server_ssl_context(certfile, keyfile) if certfile else None
        self.coordinator = Coordinator(self.token, host, port, listener=_ExecutorListener(self), ssl_options=ssl_options,
                                       heartbeat=heartbeat, handshake_timeout=handshake_timeout,
                                       max_frame_bytes=max_frame_bytes,
                                       web_port=web_port if web else None,
                                       quarantine_seconds=quarantine_seconds).start()

    # -- construction helpers ----------------------------------------------

    @property
    def url(self) -> str:
        """Where workers connect: ``tcp://host:port`` (``tls://`` with TLS)."""
        return self.coordinator.url

    @property
    def join_url(self) -> str | None:
        """The URL a browser opens to join (token in the fragment); None without ``web=True``."""
        return self.coordinator.join_url()

    @classmethod
    def local(cls, workers: int | None = None, memory: int | str | Sequence[int | str] = "64MB", *,
              token: str | bytes | None = None, cache_dir: str | os.PathLike | None = None,
              threads: int = 1, cache_size: int | str | None = None, join_timeout: float = 60.0,
              worker_args: Sequence[str] = (), **kwargs: Any) -> "TcpExecutor":
        """A coordinator plus ``workers`` worker processes on this machine.

        Parameters
        ----------
        workers:
            How many workers (default 5, or one per entry of ``memory``).
        memory:
            Budget of every worker, or a list with one budget per worker.
        token:
            Shared token (default: a fresh random one).
        cache_dir:
            Folder whose sub-folders (one per worker) keep partitions between
            crowds; a temporary folder by default, removed on close.
        threads:
            onnxruntime threads per worker.
        worker_args:
            Extra ``crowdgraph-worker`` arguments.
        **kwargs:
            Passed to the constructor (``heartbeat=``, ...).

        Examples
        --------
        >>> with TcpExecutor.local(workers=3, memory="64MB") as ex:   # doctest: +SKIP
        ...     outputs = compiled.run(batch, executor=ex)
        """
        if isinstance(memory, (str, int)):
            budgets = [memory] * (5 if workers is None else int(workers))
        else:
            budgets = list(memory)
            if workers is not None and workers != len(budgets):
                raise InputError(f"workers={workers} but memory lists {len(budgets)} budgets; give one per worker")
        if not budgets and not kwargs.get("web"):
            raise InputError("a local crowd needs at least one worker")
        for b in budgets:
            parse_bytes(b)  # fail here, not in a worker process
        kwargs.setdefault("min_workers", 1)  # all of them are waited for here; later runs take who is left
        ex = cls(token=token if token is not None else secrets.token_hex(32), join_timeout=join_timeout, **kwargs)
        try:
            ex._spawn_local(budgets, cache_dir, threads, cache_size, list(worker_args))
        except BaseException:
            ex.close()
            raise
        return ex

    @classmethod
    def from_url(cls, url: str, token: str | bytes | None = None, **kwargs: Any) -> Executor:
        """A thin executor driving the crowd of a standing ``crowdgraph serve`` at ``url``.

        The token comes from ``token`` or ``$CROWDGRAPH_TOKEN``; see
        :class:`crowdgraph_tcp.client.RemoteExecutor` for the other options.
        """
        from .client import RemoteExecutor

        return RemoteExecutor(url, token=token, **kwargs)

    def _spawn_local(self, budgets: list[int | str], cache_dir: str | os.PathLike | None, threads: int,
                     cache_size: int | str | None, extra: list[str]) -> None:
        self._tmp = tempfile.mkdtemp(prefix="crowdgraph-tcp-")
        token_file = Path(self._tmp) / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.token)
        cache_root = Path(cache_dir) if cache_dir is not None else Path(self._tmp) / "cache"
        env = dict(os.environ)
        # Make the agent importable even when this package is not installed (a source checkout).
        paths = [str(Path(__file__).resolve().parent.parent), str(Path(wire.__file__).resolve().parent.parent)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
        env.pop("CROWDGRAPH_TOKEN", None)
        for n, budget in enumerate(budgets):
            name = f"local-{n}"
            log_path = Path(self._tmp) / f"{name}.log"
            log = open(log_path, "wb")
            cmd = [sys.executable, "-m", "crowdgraph_tcp.worker", self.url, "--token-file", str(token_file),
                   "--memory", str(budget), "--cache-dir", str(cache_root / name), "--name", name,
                   "--threads", str(threads)]
            if cache_size is not None:
                cmd += ["--cache-size", str(cache_size)]
            proc = subprocess.Popen(cmd + extra, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
            self._spawned.append((name, proc, log))
            self.logs[name] = log_path
        deadline = time.monotonic() + self.join_timeout
        names = {name for name, _, _ in self._spawned}
        while True:
            joined = {w.name: w.id for w in list(self.coordinator.workers.values()) if w.name in names}
            if len(joined) == len(names):
                break
            for name, proc, _ in self._spawned:
                if proc.poll() is not None and name not in joined:
                    raise ExecutionError(f"local worker {name} exited with code {proc.returncode} before "
                                         f"joining:\n{_tail(self.logs[name])}")
            if time.monotonic() > deadline:
                missing = sorted(names - set(joined))
                raise ExecutionError(f"local workers {missing} did not join within {self.join_timeout:.0f} s; "
                                     f"last log lines:\n{_tail(self.logs[missing[0]])}")
            with self._changed:
                self._changed.wait(0.05)
        for name, proc, _ in self._spawned:  # (none for a web-only crowd)
            self.processes[joined[name]] = proc
            self.logs[joined[name]] = self.logs[name]

    # -- the executor protocol -----------------------------------------------

    def start(self, job: Job, reporter: Reporter) -> list[WorkerInfo]:
        if self._closed:
            raise ExecutionError("this TcpExecutor is closed; make a new one")
        wait_for_workers(self._changed, lambda: len(self.coordinator.workers), self.min_workers,
                         self.join_timeout, self.url)
        with self._encoded_lock:
            self._encoded.clear()

        def snapshot() -> list[WorkerInfo]:
            self.coordinator.cancel_stores()  # what an earlier run sent ahead is not needed now
            crowd, unloads = self.bridge.start(job, reporter,
                                               map(self._holding, list(self.coordinator.workers.values())))
            for worker, action in unloads:
                self._submit_now(worker, action)
            return crowd

        crowd = self.coordinator.run_sync(snapshot)
        if len(crowd) < self.min_workers:
            raise ExecutionError(f"only {len(crowd)} workers are connected, {self.min_workers} needed")
        return crowd

    def _holding(self, w: Peer) -> Holding:
        return Holding(w.id, w.memory, w.cached, w.expected_resident, w.floor_rss, self.prefetch and w.stores,
                       w.keeps_state, w.peer_address is not None)

    def _submit_now(self, worker: str, action: Action) -> None:
        """Hand ``action`` to the coordinator (IOLoop thread)."""
        self.coordinator.submit(worker, self._prepare(worker, action))

    def _prepare(self, worker: str, action: Action) -> Action:
        """Mark ``action`` as this executor's; encode a LOAD's bytes (once per codec)."""
        action.owner = self
        agreed = self.coordinator.codec_of(worker)
        if action.kind == wire.LOAD and not action.from_cache and agreed is not None:
            assert action.message is not None
            action.parts, action.message = self._load_parts(action.message, *agreed), None
        return action

    def _load_parts(self, message: Message, codec: str, version: int) -> list[Any]:
        """The LOAD frame carrying a partition's bytes, encoded once per codec (and fast or not)."""
        key = (message.header["sha256"], codec, version, message.header.get("fast", False))
        with self._encoded_lock:
            parts = self._encoded.get(key)
        if parts is None:
            parts = wire.encode_parts(message, codec=codec, version=version)
            with self._encoded_lock:
                self._encoded[key] = parts
        return parts

    def load(self, worker: str, partition: Partition) -> None:
        if self.coordinator.codec_of(worker) is None:
            return  # lost: the scheduler hears of it from worker_lost
        action = self.bridge.load(worker, partition, from_cache=self.coordinator.has_cached(worker, partition.sha256))
        if action is not None:  # the bytes are encoded here, not on the coordinator's thread
            self.coordinator.call(self.coordinator.submit, worker, self._prepare(worker, action))

    def store(self, worker: str, partition: Partition) -> None:
        if self.coordinator.codec_of(worker) is None or self.coordinator.has_cached(worker, partition.sha256):
            return  # lost, or its cache has it already
        action = self.bridge.store(worker, partition)
        if action is not None:
            self.coordinator.call(self._submit_now, worker, action)

    def unload(self, worker: str, partition: str) -> None:
        self.coordinator.call(self._submit_now, worker, self.bridge.unload(worker, partition, self.bridge.reporter))

    def run(self, worker: str, key: TaskKey, partition: Partition, inputs: Mapping[str, Any], *,
            state: TaskState | None = None) -> None:
        agreed = self.coordinator.codec_of(worker)
        if agreed is None:
            return
        lossy = self.lossy
        if not self.bridge.fetches(worker):  # a page, say: what others hold comes through here
            held = {name: v for name, v in inputs.items() if isinstance(v, HeldOutput)}
            if held:
                inputs = {**inputs, **self.gather(held)}
        action = self.bridge.run(worker, key, partition, inputs,
                                 lambda message: wire.encode_parts(message, codec=agreed[0], version=agreed[1],
                                                                   lossy=self.coordinator.lossy_for(worker, lossy)),
                                 lossy=lossy, state=state,
                                 address=lambda holder: self.coordinator.peer_address_for(worker, holder))
        if action is not None:
            self.coordinator.call(self._submit_now, worker, action)

    def gather(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Arrays of ``values``; held outputs are fetched from their workers through the coordinator."""
        held = {name: v for name, v in values.items() if isinstance(v, HeldOutput)}
        arrays = {name: np.asarray(v) for name, v in values.items() if name not in held}
        got: dict[tuple[str, tuple[str, int]], dict[str, np.ndarray]] = {}
        for worker, action in self.bridge.fetch(held.values()):
            assert action.key is not None and action.message is not None
            names = action.message.header["outputs"]
            self.coordinator.call(self._submit_now, worker, action)
            while True:
                try:
                    answer = action.purpose.future.result(timeout=0.25)
                    break
                except FutureTimeout:
                    if worker not in self.coordinator.workers:
                        raise ExecutionError(f"worker {worker}, which held outputs of task {list(action.key)}, "
                                             "was lost before they could be fetched") from None
            problem = fetched_problem(answer, action.key, worker, names) or self.bridge.fetched_problem(worker, answer)
            if problem is not None:
                self.coordinator.call(self.coordinator.drop_worker, worker, problem)
                raise ExecutionError(problem)
            got[(worker, action.key)] = dict(answer.tensors)
        for name, h in held.items():
            arrays[name] = got[(h.worker, h.task)][h.output]
        return arrays

    def forget(self, values: Sequence[Any]) -> None:
        def send() -> None:
            for worker, action in drops:
                self._submit_now(worker, action)

        drops = self.bridge.forget([v for v in values if isinstance(v, HeldOutput)])
        if drops:
            self.coordinator.call(send)

    def forget_state(self, worker: str, keys: Sequence[str]) -> None:
        self.bridge.forget_state(worker, keys)

    def quarantine(self, worker: str, reason: str) -> None:
        self.coordinator.call(self.coordinator.quarantine, worker, reason)

    def reset(self) -> None:
        def unload_all() -> None:
            for worker, action in self.bridge.reset(map(self._holding, list(self.coordinator.workers.values()))):
                self._submit_now(worker, action)

        self.coordinator.call(unload_all)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _, proc, _ in self._spawned:  # a stopped (SIGSTOP) worker could not hear BYE
            if proc.poll() is None and hasattr(signal, "SIGCONT"):
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except OSError:
                    pass
        self.coordinator.stop("the executor closed")
        deadline = time.monotonic() + 5.0
        for _, proc, _ in self._spawned:  # BYE makes them exit by themselves
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc, _ in self._spawned:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(3.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5.0)
        for _, _, log in self._spawned:
            log.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "TcpExecutor":
        return self

    def __repr__(self) -> str:
        return f"<TcpExecutor {self.url} workers={len(self.coordinator.workers)}>"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"
