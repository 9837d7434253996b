"""The pixel head under the launch configurations a GPU runs (issue #27, item 1).

By default the launcher gives CPU tensors under the interpreter whole-K chunks, 256-column logit chunks, big
tiles and 4 programs. Here each case asks ``pixel_head_config`` for the sm_90 and the sm_80 configuration
(``interpret=False``; the arches differ in ``num_warps`` / ``maxnreg`` only, which the interpreter ignores, so
the launches run the same code path) at a width narrowed for the interpreter that keeps every loop at >= 2
trips: K chunks of the block GEMMs and of the condition projection, MLP hidden chunks, logit column chunks
(256 / 64), the block loop (fp32: depth 2) and a persistent program's tiles (``max_programs`` lowered so a program runs
>= 2 tiles, the last one partial). :func:`test_every_aot_configuration_is_exercised` checks the cases against the AOT
capture list (``tests/fractal_kernels/gpu_configs.py``). Tensor-core dots (``DOT16=1``, emulated here), warps
and pipelining stay for a GPU, where these tests run on CUDA tensors (``conftest.kernel_device``).

Tolerances as ``test_pixel_head.py``'s GPU-chunking test: logits atol 1e-5 (fp32 weights) / 3e-5 (bf16 weights:
the split-operand dot keeps fp32 accuracy), ids exact (fixed uniforms; both sides use the same weights).
"""
from __future__ import annotations


import pytest
import torch

from fractal_kernels.ops.pixel_head import kernels as ph_kernels
from fractal_kernels.ops.pixel_head import _launch_triton, pixel_head_config
from fractal_kernels.reference.pixel_head import pack_pixel_head_weights, pixel_head_sample_reference

from tests.fractal_kernels import gpu_configs
from tests.fractal_kernels.ops.test_pixel_head import head as random_head

CPU = torch.device("cpu")
# pixels: guided 8-pixel tiles -> 3 tiles (the last 4 pixels), 2 programs (program 0 runs tiles 0 and 2);
# unguided 16-pixel tiles -> 2 tiles, 1 program (it runs both)
BSZ = 20


def head(width: int, depth: int, heads: int, c_in: int) -> torch.nn.Module:
    """``test_pixel_head.head`` with the condition width ``c_in`` (seeded by width + depth)."""
    return random_head(width, depth, heads, seed=width + depth, c_in=c_in)


# (width, heads, depth, condition width, guided, weight dtype): fp32 K chunks are 16 (W=32: 2, C=32: 2), 16-bit
# ones 32 (W=64: 2, C=64: 2); hidden 4W in 64-column chunks (2 / 4); the 16-bit case has one block (the
# block loop's trips are the fp32 cases')
CASES = [(32, 2, 2, 32, True, torch.float32), (32, 2, 2, 32, False, torch.float32),
         (64, 4, 1, 64, True, torch.bfloat16)]


def _id(c):
    W, H, depth, c_in, guided, dt = c
    return f"W{W}-H{H}-depth{depth}-C{c_in}-{'guided' if guided else 'unguided'}-{str(dt)[6:]}"


def _configs(W, c_in, guided, dt):
    """{code path: [(arch, config)]} of the case's sm_90 / sm_80 configurations."""
    return gpu_configs.by_path(pixel_head_config, lambda cfg: gpu_configs.code_path(
        "_pixel_head_kernel", str(dt)[6:], dict(GUIDED=guided, BLOCK_B=cfg.block_b, KC=cfg.kc, NC=cfg.nc,
                                                HC=cfg.hc, BK=cfg.bk)), W, 4 * W, c_in, BSZ, guided, dt)


def paths():
    return {p for W, _, _, c_in, guided, dt in CASES for p in _configs(W, c_in, guided, dt)}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_pixel_head_gpu_configs(case, kernel_device):
    W, H, depth, c_in, guided, dt = case
    w = pack_pixel_head_weights(head(W, depth, H, c_in), dt)
    g = torch.Generator().manual_seed(W)
    cond = torch.randn(2 * BSZ if guided else BSZ, c_in, generator=g)
    u = torch.rand(3, BSZ, generator=g, dtype=torch.float64)
    cfg_t = torch.linspace(1.0, 4.0, BSZ) if guided else None
    ref_ids, ref_logits = pixel_head_sample_reference(cond, w, H, guided=guided, cfg=cfg_t if guided else 1.0,
                                                      inv_temperature=1.0, filter_threshold=1e-4, top_p=0.9,
                                                      uniforms=u, return_logits=True)
    dev = kernel_device
    wd = type(w)(*(t.to(dev) for t in w))
    for path, ((arch, cfg), *_) in _configs(W, c_in, guided, dt).items():
        # every loop >= 2 trips at this width, a program runs >= 2 tiles, the last tile is partial
        assert W >= 2 * cfg.kc and c_in >= 2 * cfg.bk and 4 * W >= 2 * cfg.hc and 256 >= 2 * cfg.nc
        tiles = -(-BSZ // cfg.block_b)
        programs = 2 if tiles >= 3 else 1
        assert tiles >= 2 * programs - 1 and tiles > programs and BSZ % cfg.block_b
        ids = torch.full((BSZ, 3), -7, dtype=torch.int64, device=dev)
        logits = torch.full((3, cond.shape[0], 256), float("nan"), device=dev)
        with gpu_configs.recording(ph_kernels._pixel_head_kernel) as seen:
            _launch_triton(cond.to(dev), wd, H, guided, cfg_t.to(dev) if guided else None, 1.0, 1.0, 1e-4, 0.9,
                           False, u.to(dev), 0, 0, 0, ids, logits=logits, config=cfg, max_programs=programs)
        assert len(seen) == 1 and seen[0]["grid"] == (programs,), f"sm_{arch}: {seen}"
        gpu_configs.check_gpu_options(seen[0], cfg)
        assert gpu_configs.launched_path("_pixel_head_kernel", seen[0]) == path
        torch.testing.assert_close(logits.cpu(), ref_logits, atol=1e-5 if dt == torch.float32 else 3e-5, rtol=0)
        assert torch.equal(ids.cpu(), ref_ids)


def test_every_aot_configuration_is_exercised():
    """Every (sm_90, sm_80) launch of the AOT capture list has its code path among the cases above."""
    assert not gpu_configs.missing("_pixel_head_kernel", paths()), gpu_configs.missing("_pixel_head_kernel", paths())
