"""Byte sizes as people write them ("48MB", "1.5 GiB") and back.

crowdgraph prints every size in decimal units (1 MB = 1,000,000 bytes,
as in Dask and as phones and disks are sold); it reads binary units
(MiB = 1,048,576 bytes) too, so ``"64MiB"`` is printed back as 67.1 MB.
"""

from __future__ import annotations

import math
import re
import reprlib

from .errors import InputError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9,
}
_PATTERN = re.compile(r"^\s*([0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})\s*([a-zA-Z]*)\s*$")

#: The largest size accepted (1 EB): anything above is a typo, not a device.
MAX_BYTES = 10**18

#: What every size in crowdgraph's tables means, printed once under them.
UNITS_NOTE = "sizes in decimal units: 1 MB = 1,000,000 bytes"


def parse_bytes(value: int | float | str) -> int:
    """Return a byte count from an int or a string such as ``"48MB"``.

    Decimal units (kB, MB, GB) are powers of 1000, binary ones (KiB, MiB,
    GiB) powers of 1024, as in Dask.  Anything else (negative, NaN,
    infinite, a bool, an unknown unit, more than :data:`MAX_BYTES`)
    raises :class:`~crowdgraph.errors.InputError`, which is a
    ``ValueError``.

    >>> parse_bytes("48MB")
    48000000
    >>> parse_bytes("1.5 KiB")
    1536
    >>> parse_bytes(4096)
    4096
    >>> parse_bytes("5XB")
    Traceback (most recent call last):
    crowdgraph.errors.InputError: not a byte size: '5XB'; write a number and a unit such as '48MB', '64MiB' or '1GB'
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"not a byte size: {reprlib.repr(value)}; give a number of bytes or a string such as '48MB'")
    if isinstance(value, str):
        match = _PATTERN.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise InputError(
                f"not a byte size: {reprlib.repr(value)}; write a number and a unit such as '48MB', '64MiB' or '1GB'"
            )
        value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 0 or value > MAX_BYTES:
        raise InputError(f"byte size must be a finite number from 0 to 1 EB, got {reprlib.repr(value)}")
    return int(value)


def format_bytes(n: int | float) -> str:
    """Return ``n`` bytes in decimal units with three significant figures.

    >>> format_bytes(48_000_000)
    '48.0 MB'
    >>> format_bytes(512)
    '512 B'
    """
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size >= 100 else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
