"""The random streams the models draw from, and how to seed them as the public code does.

The reference (LTH14/fractalgen) draws from two global generators:

* **torch's CPU generator**: MAR/AR random orders, label drops, the pixel head's rounding noise, dropout
  (on the device's generator when the model is on a GPU), ``torch.multinomial``;
* **numpy's global ``RandomState``**: the MAR levels' mask count in eval mode (``np.random.randint(L) + 1``)
  and their mask ratios in training (scipy's ``truncnorm(-4, 0, loc=1, scale=0.25).rvs(B)``, which draws
  one ``random_sample`` per row from that same global state).

Its training script seeds both with the same number (``torch.manual_seed(s); np.random.seed(s)``);
:func:`manual_seed` does exactly that, so a seed gives the reference's losses. Sampling draws nothing
from numpy.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np
import torch

_U64 = 1 << 64
_U32 = 1 << 32


def numpy_seed(seed: int) -> Union[int, List[int]]:
    """The argument ``np.random.seed`` gets for a torch-style seed.

    Seeds in ``[0, 2³²)`` pass through unchanged (what the reference does). Others are taken mod 2⁶⁴, as
    ``torch.manual_seed`` takes negative seeds, and given to numpy as two 32-bit words, so distinct 64-bit
    seeds stay distinct (``np.random.seed`` itself only takes ``[0, 2³²)`` as an int).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    seed = int(seed)
    if 0 <= seed < _U32:
        return seed
    s = seed % _U64
    return [s & (_U32 - 1), s >> 32]


def manual_seed(seed: int) -> None:
    """Seed torch's generators (CPU and every CUDA device) and numpy's global RNG, as the reference's
    scripts do; after it, the MAR/AR losses of a model equal the public code's under the same seed."""
    np.random.seed(numpy_seed(seed))
    torch.manual_seed(seed)


@contextlib.contextmanager
def fork_rng(seed: Optional[int], device: Optional[torch.device] = None) -> Iterator[None]:
    """Run the block under :func:`manual_seed` ``(seed)`` and restore torch's (CPU, and ``device``'s if it is
    CUDA) and numpy's global states afterwards; ``seed=None`` leaves every generator alone."""
    if seed is None:
        yield
        return
    devices = [device] if device is not None and device.type == "cuda" else []
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            manual_seed(seed)
            yield
    finally:
        np.random.set_state(np_state)


def numpy_state() -> Dict[str, Any]:
    """numpy's global RNG state as tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`numpy_state`."""
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, int(state["pos"]), int(state["has_gauss"]),
                         float(state["cached_gaussian"])))
