"""Scratch workspaces are written before they are read (issue #27, item 3).

The pixel head and the block stacks keep per-program fp32 workspaces (``fractal_kernels._scratch.workspace``).
``torch.empty`` memory is usually zeros or an earlier launch's finite values, so a kernel reading a workspace
element before writing it (a padded row, a masked column, the previous tile's or sequence's values) could pass
every other test. Here every workspace starts as NaN (``_scratch.poisoned``; checked at the launch): the outputs
must be finite and bitwise equal to an unpoisoned launch of the same configuration. Each kernel runs the launcher's
default configuration (interpreter-speed on a CPU) and a GPU one (sm_90's: smaller chunks, masked widths, padded
rows and a persistent program's second item, where a stale read would hide). This runs on a CPU too (the
interpreter); on a GPU on CUDA tensors (``conftest.kernel_device``).
"""
from __future__ import annotations

import pytest
import torch

from fractal_kernels import _scratch
from fractal_kernels.ops.ar_stack import ar_stack_cache
from fractal_kernels.ops.ar_stack import kernels as ar_kernels
from fractal_kernels.ops.ar_stack.launch import ar_stack_config
from fractal_kernels.ops.ar_stack.launch import launch_triton as ar_launch
from fractal_kernels.ops.mar_stack import kernels as mar_kernels
from fractal_kernels.ops.mar_stack.launch import _launch_triton as mar_launch
from fractal_kernels.ops.mar_stack.launch import mar_stack_config
from fractal_kernels.ops.pixel_head import kernels as ph_kernels
from fractal_kernels.ops.pixel_head import _launch_triton as ph_launch
from fractal_kernels.ops.pixel_head import pixel_head_config
from fractal_kernels.reference.pixel_head import pack_pixel_head_weights

from tests.fractal_kernels import gpu_configs
from tests.fractal_kernels.ops.test_pixel_head_gpu_configs import head
from tests.fractal_kernels.ops.test_stack_gpu_configs import ar_weights, mar_weights

CONFIGS = ["default", "sm_90"]  # the launcher's own choice for the device (interpreter-speed on the CPU), sm_90's


def _all_nan_ws(launch):
    ws = launch["args"]["ws_ptr"]
    assert ws.numel() > 0 and torch.isnan(ws).all(), "the workspace was not poisoned"


def _twice(kernel, run):
    """``run()`` (returns the outputs) clean and with NaN workspaces; the outputs must match and be finite."""
    clean = [t.clone() for t in run()]
    with _scratch.poisoned(), gpu_configs.recording(kernel, before=_all_nan_ws) as seen:
        poisoned = run()
    assert seen, "no launch"
    for a, b in zip(clean, poisoned):
        assert torch.isfinite(b).all(), "a workspace element was read before it was written (NaN reached the output)"
        assert torch.equal(a, b), "the outputs depend on the workspace's initial contents"


def _cfg(name, fn, *args, device):
    return fn(*args, device) if name == "default" else fn(*args, device, arch=90, interpret=False)


# (config, D, heads, hidden): D=80, head dim 40, hidden 96: masked column / head-dim chunks (both configs);
# D=128, head dim 64, hidden 128: sm_90's chunks divide them (EVEN)
STACK_CASES = [("default", 80, 2, 96), ("sm_90", 80, 2, 96), ("sm_90", 128, 2, 128)]


@pytest.mark.parametrize("which,D,H,hid", STACK_CASES)
def test_mar_stack_workspace(which, D, H, hid, kernel_device):
    # L=17 (15 padded rows); 3 sequences on 2 programs (program 0 reuses its workspace for sequence 2)
    L = 17
    w = mar_weights(D, hid, 1, torch.float32, seed=7)
    w = type(w)(*(t.to(kernel_device) if isinstance(t, torch.Tensor) else t for t in w))
    x = torch.randn(3, L, D, generator=torch.Generator().manual_seed(3)).to(kernel_device)
    cfg = _cfg(which, mar_stack_config, D, hid, D // H, L, torch.float32, device=kernel_device)

    def run():
        out = torch.empty_like(x)
        mar_launch(x, w, H, out, config=cfg, max_programs=2)
        return [out]
    _twice(mar_kernels._mar_stack_kernel, run)


@pytest.mark.parametrize("which,D,H,hid", STACK_CASES)
def test_ar_stack_workspace(which, D, H, hid, kernel_device):
    # 17 rows (the second tile: 1 row, 15 padded), position 4 (3 key chunks of the GPU configuration)
    bsz, pos = 17, 4
    w = ar_weights(D, hid, 1, torch.float32, seed=5)
    w = type(w)(*(t.to(kernel_device) if isinstance(t, torch.Tensor) else t for t in w))
    g = torch.Generator().manual_seed(4)
    freqs = torch.randn(pos + 1, D // H // 2, 2, generator=g).to(kernel_device)
    x = torch.randn(bsz, D, generator=g).to(kernel_device)
    cache0 = torch.randn(ar_stack_cache(w, bsz, pos + 1, "cpu").shape, generator=g).to(kernel_device)
    cfg = _cfg(which, ar_stack_config, D, D // H, torch.float32, device=kernel_device)

    def run():
        out, cache = torch.empty_like(x), cache0.clone()
        ar_launch(x, w, cache, pos, freqs, H, out, config=cfg)
        return [out, cache]
    _twice(ar_kernels._ar_stack_decode_kernel, run)


@pytest.mark.parametrize("which", CONFIGS)
@pytest.mark.parametrize("guided", [True, False])
def test_pixel_head_workspace(which, guided, kernel_device):
    # 20 pixels: partial last tile; 2 programs over 3 tiles (guided, GPU configuration)
    W, H, depth, c_in, bsz = 32, 2, 1, 32, 20
    w = pack_pixel_head_weights(head(W, depth, H, c_in), torch.float32)
    w = type(w)(*(t.to(kernel_device) for t in w))
    g = torch.Generator().manual_seed(9)
    cond = torch.randn(2 * bsz if guided else bsz, c_in, generator=g).to(kernel_device)
    u = torch.rand(3, bsz, generator=g, dtype=torch.float64).to(kernel_device)
    cfg = _cfg(which, pixel_head_config, W, 4 * W, c_in, bsz, guided, torch.float32, device=kernel_device)

    def run():
        ids = torch.full((bsz, 3), -7, dtype=torch.int64, device=kernel_device)
        logits = torch.empty(3, cond.shape[0], 256, device=kernel_device)
        ph_launch(cond, w, H, guided, None, 3.0 if guided else 1.0, 1.0, 1e-4, 0.9, False, u, 0, 0, 0, ids,
                  logits=logits, config=cfg, max_programs=2)
        return [ids, logits]
    _twice(ph_kernels._pixel_head_kernel, run)
