"""Memory sizes with explicit units: parsing "80GB" / "80GiB" and printing bytes in both units."""

from __future__ import annotations

import re

GIB = 1 << 30
GB = 10**9

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": GB, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": GIB,
          "tib": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_memory(text: str) -> int:
    """Bytes of a size with an explicit unit, case-insensitive: "80GB" = 80·10⁹, "80GiB" = 80·2³⁰, "81920MiB".

    Units: B, KB, MB, GB, TB (powers of 10) and KiB, MiB, GiB, TiB (powers of 2). A bare number is refused: an
    "80 GB" card is 80·10⁹ bytes by its label but about 79.6 GiB, and the two differ by 7%.
    """
    if not isinstance(text, str):
        raise TypeError(f"memory size must be a string like '80GiB', got {type(text).__name__}")
    match = _SIZE.fullmatch(text)
    if match is not None and not match.group(2):
        raise ValueError(f"memory size needs a unit: GB (10^9 bytes) or GiB (2^30 bytes), e.g. '{match.group(1)}GiB' "
                         f"or '{match.group(1)}GB', got {text!r}")
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"memory size must be a positive number with a unit "
                         f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def gib_and_gb(nbytes: int) -> str:
    """`nbytes` as "74.51 GiB = 80.00 GB"."""
    return f"{nbytes / GIB:.2f} GiB = {nbytes / GB:.2f} GB"
