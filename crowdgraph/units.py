"""Byte sizes as people write them ("48MB", "1.5 GiB") and back."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Return a byte count from an int or a string such as ``"48MB"``.

    Decimal units (kB, MB, GB) are powers of 1000, binary ones (KiB, MiB,
    GiB) powers of 1024, as in Dask.

    >>> parse_bytes("48MB")
    48000000
    >>> parse_bytes("1.5 KiB")
    1536
    >>> parse_bytes(4096)
    4096
    """
    if isinstance(value, bool):
        raise ValueError(f"not a byte size: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"byte size must not be negative, got {value!r}")
        return int(value)
    match = _PATTERN.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"not a byte size: {value!r}; write a number and a unit such as "
            "'48MB', '64MiB' or '1GB'"
        )
    return int(float(match.group(1)) * _UNITS[unit])


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
