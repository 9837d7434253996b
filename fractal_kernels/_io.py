"""Atomic file writes: the one helper every package of this repo uses for files users keep.

A reader (or a crash) must never see half a file: the data goes to a temp file in the target's own folder
(same filesystem, so the rename is atomic), then ``os.replace`` puts it in place. On any error the temp file
is removed and the old file, if any, is untouched. Used by the dispatch policy data
(``fractal_kernels.policy``), the models' checkpoints, PNGs, sample archives and weight metadata
(``fractal_models``) and the benchmark results (``benchmarks.harness``).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator, Union


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", *, suffix: str = "", fsync: bool = False,
                encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing (``mode`` "wb" or "w"); on a clean exit of the block it
    replaces ``path``. The folder is created if missing. ``suffix`` ends the temp file's name (for writers that
    look at it); ``fsync`` flushes the data to the disk before the rename (checkpoints: a power cut after the
    rename must not leave an empty file)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: expected 'wb' or 'w', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": encoding})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str, data: Union[bytes, str], *, suffix: str = "", fsync: bool = False) -> str:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically (see :func:`atomic_file`); returns
    ``path``."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w", suffix=suffix, fsync=fsync) as f:
        f.write(data)
    return path
