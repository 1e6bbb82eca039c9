"""Partitions on a Dask worker's local disk, so a later load reads them there (tier 2).

Each worker keeps its own folder of ``<sha256>.onnx`` files: the
partition's bytes exactly as crowdgraph made them, so the file name is the
check.  A file is hashed again before every use; one that changed on disk
is removed and the executor sends the bytes instead.  The folder stays
under a size bound, least recently used out first (a use sets the
file's modification time).  Nothing here is unpickled: the files are ONNX
bytes, handed to onnxruntime only after their sha256 matched.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

_ENTRY = re.compile(r"([0-9a-f]{64})\.onnx")
#: Most digests a worker announces (the scheduler only needs the current plan's).
MAX_ANNOUNCED = 10_000


def folder_for(worker: Any, cache_dir: str | os.PathLike | None) -> Path:
    """The cache folder of ``worker``: ``<cache_dir>/<worker name>``, else in its local directory.

    A worker's local directory lasts as long as the worker; a ``cache_dir``
    (a path on the worker's machine) outlives it, one folder per worker name.

    >>> worker = type("W", (), {"name": "tcp://10.0.0.2:4001", "local_directory": "/scratch/w1"})()
    >>> folder_for(worker, None).as_posix(), folder_for(worker, "/var/cache/cg").as_posix()
    ('/scratch/w1/crowdgraph-partitions', '/var/cache/cg/tcp___10.0.0.2_4001')
    """
    if cache_dir is None:
        return Path(worker.local_directory) / "crowdgraph-partitions"
    return Path(cache_dir) / re.sub(r"[^A-Za-z0-9_.-]", "_", str(worker.name))


class DiskCache:
    """``<sha256>.onnx`` files in one folder, at most ``max_bytes`` of them.

    >>> import tempfile
    >>> cache = DiskCache(tempfile.mkdtemp(), max_bytes=10)
    >>> a, b = b"123456", b"abcdef"
    >>> sha_a, sha_b = hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()
    >>> cache.put(sha_a, a), cache.get(sha_a) == a, cache.digests() == [sha_a]
    (True, True, True)
    >>> cache.put(sha_b, b), cache.get(sha_a), cache.digests() == [sha_b]   # a makes room for b
    (True, None, True)
    >>> cache.put(hashlib.sha256(b"x" * 11).hexdigest(), b"x" * 11)         # larger than the bound
    False
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)

    def _entries(self) -> list[tuple[float, int, str]]:
        """(last use, bytes, sha256) of each entry, least recently used first."""
        entries = []
        for path in self.folder.iterdir():
            match = _ENTRY.fullmatch(path.name)
            if match is None:
                continue
            try:
                stat = path.stat()
            except OSError:  # removed meanwhile
                continue
            entries.append((stat.st_mtime, stat.st_size, match.group(1)))
        return sorted(entries)

    def digests(self) -> list[str]:
        """The cached partitions' sha256, most recently used first."""
        return [sha for _, _, sha in reversed(self._entries())][:MAX_ANNOUNCED]

    def get(self, sha256: str) -> bytes | None:
        """The bytes of ``sha256``, checked; None when absent or changed on disk (then removed)."""
        path = self.folder / f"{sha256}.onnx"
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            path.unlink(missing_ok=True)
            return None
        _touch(path)
        return data

    def put(self, sha256: str, data: bytes) -> bool:
        """Keep ``data`` (whose sha256 the caller checked) within the bound; False when larger than it."""
        if len(data) > self.max_bytes:
            return False
        entries = [e for e in self._entries() if e[2] != sha256]
        total = sum(size for _, size, _ in entries)
        for _, size, old in entries:
            if total + len(data) <= self.max_bytes:
                break
            (self.folder / f"{old}.onnx").unlink(missing_ok=True)
            total -= size
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            _touch(Path(tmp))
            os.replace(tmp, self.folder / f"{sha256}.onnx")  # whole or not at all
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return True


def _touch(path: Path) -> None:
    """Mark ``path`` most recently used, to the nanosecond (the kernel's own stamp is coarser)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))
