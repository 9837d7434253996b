"""Loading the reference's checkpoints safely, and writing ours atomically.

A published ``checkpoint-last.pth`` is a dict with ``model``, ``optimizer``, ``epoch``, ``scaler`` and
``args`` (an ``argparse.Namespace``). We load it with ``weights_only=True`` and only ``argparse.Namespace``
allowed as an extra global, so a checkpoint cannot run code. Every failure is one ``CheckpointError``
line saying what is wrong.
"""
from __future__ import annotations

import argparse
import os
import pickle
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from fractal_kernels._io import atomic_file


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a checkpoint file without executing code; returns the dict (a bare state_dict is wrapped)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps the real cause in advice to retry with weights_only=False, which we must not give
        text = str(e)
        cause = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
        if "trusted source." in cause:
            cause = cause.split("trusted source.", 1)[1]
        cause = " ".join(cause.split()) or type(e).__name__
        if "GLOBAL" in cause or "global" in cause:
            raise CheckpointError(f"checkpoint {path!r}: refused to unpickle code it would have to run "
                                  f"(weights_only=True): {cause}") from None
        raise CheckpointError(f"checkpoint {path!r}: not a readable PyTorch checkpoint (corrupt or truncated: "
                              f"{cause})") from None
    except Exception as e:  # torch.load raises many types on a foreign file; all mean "not a checkpoint"
        raise CheckpointError(f"checkpoint {path!r}: not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise CheckpointError(f"checkpoint {path!r}: expected a dict with a 'model' state_dict "
                          f"(or a bare state_dict), got {type(obj).__name__}"
                          + (f" with keys {sorted(obj)[:5]}" if isinstance(obj, dict) else ""))


def _shape_mismatch(own: Dict[str, tuple], theirs: Dict[str, tuple]) -> Optional[str]:
    missing = [k for k in own if k not in theirs]
    extra = [k for k in theirs if k not in own]
    shapes = [k for k in own if k in theirs and own[k] != theirs[k]]
    if not (missing or extra or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} with other shapes (e.g. {k}: {theirs[k]} vs {own[k]})")
    return ", ".join(parts)


def _mismatch(model: nn.Module, state: Dict[str, torch.Tensor]) -> Optional[str]:
    return _shape_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()},
                           {k: tuple(v.shape) for k, v in state.items()})


_PUBLISHED_SHAPES: Dict[str, Dict[str, tuple]] = {}


def identify_config(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """The published config whose state_dict has exactly these names and shapes, if any."""
    from fractal_models.configs import CONFIG_NAMES, build_model
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    for name in CONFIG_NAMES:
        if name not in _PUBLISHED_SHAPES:  # building one on the meta device takes seconds: once per process
            with torch.device("meta"):
                _PUBLISHED_SHAPES[name] = {k: tuple(v.shape) for k, v in build_model(name).state_dict().items()}
        if _shape_mismatch(_PUBLISHED_SHAPES[name], theirs) is None:
            return name
    return None


def load_checkpoint(path: str, model: nn.Module, *, strict: bool = True,
                    ckpt: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Load ``path``'s ``model`` weights into ``model`` (``strict`` by default); returns the whole dict.
    ``ckpt``: the already-read dict of ``path`` (from :func:`read_checkpoint`), to avoid reading twice.

    Raises :class:`CheckpointError` with one line if the file is not such a checkpoint or its weights
    belong to another configuration (naming that configuration when it is a published one).
    """
    if ckpt is None:
        ckpt = read_checkpoint(path)
    state = ckpt["model"]
    problem = _mismatch(model, state)
    if problem is not None and strict:
        other = identify_config(state)
        hint = f"; it looks like a {other!r} checkpoint" if other else ""
        raise CheckpointError(f"checkpoint {path!r} does not match the model: {problem}{hint}")
    model.load_state_dict(state, strict=strict)
    return ckpt


def save_checkpoint(path: str, model: nn.Module, *, optimizer: Optional[torch.optim.Optimizer] = None,
                    epoch: int = 0, scaler: Any = None, args: Any = None, **extra: Any) -> None:
    """Write a reference-layout checkpoint atomically (temp file in the same folder, then rename)."""
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None,
               "epoch": epoch, "scaler": scaler.state_dict() if hasattr(scaler, "state_dict") else scaler,
               "args": args, **extra}
    with atomic_file(path, suffix=".pth", fsync=True) as f:
        torch.save(payload, f)
