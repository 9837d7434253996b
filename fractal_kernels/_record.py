"""What ran: the choice each op made last (:func:`fractal_kernels.dispatch.last_backend`), kept apart from the
choosing so both stay short; :mod:`fractal_kernels.dispatch` re-exports these."""
from __future__ import annotations

import os
import sys
from typing import Dict, Optional

_LAST: Dict[str, str] = {}


def record(op: str, choice: str) -> str:
    """Note that ``choice`` runs ``op`` (for ``last_backend`` and ``FRACTAL_KERNELS_VERBOSE``); returns it.
    Ops call it directly for choices outside the three backends (e.g. "sdpa" for long attention)."""
    _LAST[op] = choice
    if os.environ.get("FRACTAL_KERNELS_VERBOSE") == "1":
        print(f"fractal_kernels: {op} -> {choice}", file=sys.stderr)
    return choice


def last_backend(op: str) -> Optional[str]:
    """The backend that ran ``op`` most recently in this process (None if it has not run)."""
    return _LAST.get(op)


def forget(op: Optional[str] = None) -> None:
    """Clear what :func:`last_backend` remembers for ``op`` (every op if None), so a caller can tell which ops
    ran, and where, inside a block (the benchmarks do, to fail a row that fell back to another backend)."""
    if op is None:
        _LAST.clear()
    else:
        _LAST.pop(op, None)
