"""The fused block stacks under the launch configurations a GPU runs (issue #27, item 1).

By default the launchers give CPU tensors under the interpreter whole-width chunks (MAR), 16-key chunks (AR)
and 4 programs, so the interpreter tests never run a GPU's chunk loops, its EVEN variant, an online softmax
across key chunks or a persistent program's second sequence. Here each case asks ``mar_stack_config`` /
``ar_stack_config`` for the sm_90 and the sm_80 configuration (``interpret=False``; today both arches get the
same one, and the case runs it once) at a width narrowed for the interpreter that keeps every loop at >= 2
trips: output-column chunks, K chunks, head-dim chunks (MAR), key chunks (AR: positions past two chunks),
the block loop (fp32 cases: depth 2), a persistent program's sequences (MAR: ``max_programs`` lowered to 2 for
3 sequences) and the row tiles (AR: 17 rows, two 16-row programs). Each code path of ``benchmarks.aot``'s cases
(the AOT capture list) has an EVEN case here, plus masked ones (widths that the chunks do not divide).
:func:`test_every_aot_configuration_is_exercised` checks that against the capture (``tests/fractal_kernels/
gpu_configs.py`` says which fields are compared). What the interpreter cannot run -- tensor-core dots
(``DOT16=1``, emulated here), warps, barriers, pipelining -- stays for a GPU, where these tests run on CUDA
tensors (``conftest.kernel_device``).

Numerics as ``test_mar_stack.py`` / ``test_ar_stack.py``: against the fp64 references with the kernels' rounding
points (``tests/fractal_kernels/numerics.py``). Weights have unit gain per linear (std ``fan_in ** -0.5``), so
the fp32 tolerances of those files hold at these widths.
"""
from __future__ import annotations

import pytest
import torch

from fractal_kernels.ops.ar_stack import kernels as ar_kernels
from fractal_kernels.ops.ar_stack.launch import BM, ar_stack_config
from fractal_kernels.ops.ar_stack.launch import even as ar_even
from fractal_kernels.ops.ar_stack.launch import check as ar_check
from fractal_kernels.ops.ar_stack.launch import launch_triton as ar_launch
from fractal_kernels.ops.mar_stack import kernels as mar_kernels
from fractal_kernels.ops.mar_stack.launch import _launch_triton as mar_launch
from fractal_kernels.ops.mar_stack.launch import even as mar_even
from fractal_kernels.ops.mar_stack.launch import mar_stack_config
from fractal_kernels.reference.ar_stack import ArStackWeights
from fractal_kernels.reference.mar_stack import MarStackWeights

from tests.fractal_kernels import gpu_configs
from tests.fractal_kernels.ops.test_ar_stack import check_steps
from tests.fractal_kernels.ops.test_mar_stack import close_to_reference

CPU = torch.device("cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
MAR_PROGRAMS = 2  # the persistent grid's cap in these tests: 3 sequences, program 0 runs sequences 0 and 2


def _rand(g, *shape, std=1.0, mean=0.0):
    return torch.randn(*shape, generator=g) * std + mean


def mar_weights(D, hidden, depth, wdtype, seed=0) -> MarStackWeights:
    """Random fp32 LayerNorm params around (1, 0), unit-gain matrices in ``wdtype``, biases 0.1."""
    g = torch.Generator().manual_seed(seed)
    mat = lambda *s: _rand(g, *s, std=s[-1] ** -0.5).to(wdtype)  # noqa: E731
    vec = lambda *s, mean=0.0: _rand(g, *s, std=0.2 if mean else 0.1, mean=mean)  # noqa: E731
    return MarStackWeights(vec(depth, D, mean=1.0), vec(depth, D), mat(depth, 3 * D, D), vec(depth, 3 * D),
                           mat(depth, D, D), vec(depth, D), vec(depth, D, mean=1.0), vec(depth, D),
                           mat(depth, hidden, D), vec(depth, hidden), mat(depth, D, hidden), vec(depth, D),
                           vec(D, mean=1.0), vec(D), 1e-6)


def ar_weights(D, hidden, depth, wdtype, seed=0) -> ArStackWeights:
    g = torch.Generator().manual_seed(seed)
    mat = lambda *s: _rand(g, *s, std=s[-1] ** -0.5).to(wdtype)  # noqa: E731
    return ArStackWeights(mat(depth, 3 * D, D), mat(depth, D, D), mat(depth, hidden, D), mat(depth, hidden, D),
                          mat(depth, D, hidden), _rand(g, depth, D, std=0.2, mean=1.0),
                          _rand(g, depth, D, std=0.2, mean=1.0), torch.full((depth, 2), 1e-5),
                          _rand(g, D, std=0.2, mean=1.0), _rand(g, D, std=0.1), 1e-6)


def _to(t, device):
    return type(t)(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in t))


# ---- MAR: (D, heads, hidden, L, weight dtype, depth); 3 sequences -------------------------------------------
# LP 32 (L=17): 64-column chunks, K chunks 16 (fp32) / 32 (16-bit), head-dim chunks 16; D=128: 2 column chunks,
# 8 / 4 K chunks, 4 head-dim chunks. LP 64 (L=40): 32-column chunks; D=64. Masked: D=80 (80 = 64 + 16 columns,
# head dim 40 = 16 + 16 + 8), hidden 96.
MAR_CASES = [
    (128, 2, 128, 17, F32, 2), (128, 2, 128, 17, BF16, 1), (128, 2, 128, 17, F16, 1),
    (64, 2, 64, 40, F32, 2), (64, 2, 64, 40, BF16, 1),
    (80, 2, 96, 17, F32, 2), (80, 2, 96, 17, BF16, 1),
]


def _mar_id(c):
    D, H, hid, L, dt, depth = c
    return f"D{D}-H{H}-M{hid}-L{L}-{str(dt)[6:]}-depth{depth}"


def _mar_configs(D, H, hid, L, dt):
    """{code path: [(arch, config)]} of the case's sm_90 / sm_80 configurations."""
    return gpu_configs.by_path(mar_stack_config, lambda cfg: gpu_configs.code_path(
        "_mar_stack_kernel", str(dt)[6:], dict(LP=cfg.lp, NC=cfg.nc, KC=cfg.kc, DC=cfg.dc,
                                               EVEN=mar_even(cfg, D, hid, D // H))), D, hid, D // H, L, dt)


def mar_paths():
    """The code paths :data:`MAR_CASES` run."""
    return {p for D, H, hid, L, dt, _ in MAR_CASES for p in _mar_configs(D, H, hid, L, dt)}


@pytest.mark.parametrize("case", MAR_CASES, ids=_mar_id)
def test_mar_stack_gpu_configs(case, kernel_device):
    D, H, hid, L, dt, depth = case
    w = _to(mar_weights(D, hid, depth, dt, seed=D + depth), kernel_device)
    x = torch.randn(3, L, D, generator=torch.Generator().manual_seed(L)).to(kernel_device)
    for path, ((arch, cfg), *_) in _mar_configs(D, H, hid, L, dt).items():
        # every loop >= 2 trips at this width (the point of the case)
        assert D > cfg.nc and D >= 2 * cfg.kc and D // H >= 2 * cfg.dc and hid > cfg.nc and 3 > MAR_PROGRAMS
        out = torch.full_like(x, float("nan"))
        with gpu_configs.recording(mar_kernels._mar_stack_kernel) as seen:
            mar_launch(x, w, H, out, config=cfg, max_programs=MAR_PROGRAMS)
        assert len(seen) == 1 and seen[0]["grid"] == (MAR_PROGRAMS,), f"sm_{arch}: {seen}"
        gpu_configs.check_gpu_options(seen[0], cfg)
        assert gpu_configs.launched_path("_mar_stack_kernel", seen[0]) == path
        close_to_reference(out.cpu(), x.cpu(), _to(w, CPU), H)


# ---- AR: (D, heads, hidden, weight dtype, depth, rows, positions run) ------------------------------------------
# K chunks 16 / 32, 64-column chunks (D=128: 2), keys per chunk 2048 / (16 * HDP): 2 at head dim 64 (position 5:
# 6 keys, 3 chunks), 4 at head dim 32 (position 9: 10 keys, 3 chunks, the last partial). Masked: D=96 (64 + 32
# columns; head dim 48 padded to 64), hidden 80. 17 rows: a full and a 1-row tile.
AR_CASES = [
    (128, 2, 128, F32, 2, 2, (0, 5)), (128, 2, 128, BF16, 1, 17, (5,)), (128, 2, 128, F16, 1, 2, (5,)),
    (128, 4, 128, F32, 1, 17, (9,)), (128, 4, 128, BF16, 1, 2, (9,)),
    (96, 2, 80, F32, 2, 17, (5,)), (96, 2, 80, BF16, 1, 2, (5,)),
]


def _ar_id(c):
    D, H, hid, dt, depth, bsz, positions = c
    return f"D{D}-H{H}-M{hid}-{str(dt)[6:]}-depth{depth}-B{bsz}-pos{'+'.join(map(str, positions))}"


def _ar_configs(D, H, hid, dt):
    return gpu_configs.by_path(ar_stack_config, lambda cfg: gpu_configs.code_path(
        "_ar_stack_decode_kernel", str(dt)[6:], dict(BM=BM, KC=cfg.kc, NC=cfg.nc, KB=cfg.kb,
                                                     EVEN=ar_even(cfg, D, hid))), D, D // H, dt)


def ar_paths():
    """The code paths :data:`AR_CASES` run."""
    return {p for D, H, hid, dt, *_ in AR_CASES for p in _ar_configs(D, H, hid, dt)}


@pytest.mark.parametrize("case", AR_CASES, ids=_ar_id)
def test_ar_stack_gpu_configs(case, kernel_device):
    D, H, hid, dt, depth, bsz, positions = case
    w = _to(ar_weights(D, hid, depth, dt, seed=D + H), kernel_device)
    T = max(positions) + 1
    g = torch.Generator().manual_seed(bsz)
    freqs = torch.randn(T, D // H // 2, 2, generator=g).to(kernel_device)
    xs = [torch.randn(bsz, D, generator=g).to(kernel_device) for _ in range(T)]
    for path, ((arch, cfg), *_) in _ar_configs(D, H, hid, dt).items():
        # every loop >= 2 trips: column and K chunks, and the last position's keys span > 2 key chunks
        assert D > cfg.nc and D >= 2 * cfg.kc and max(positions) + 1 > 2 * cfg.kb

        def step(x, w, cache, pos, freqs, heads):
            wc = ar_check(x, w, cache, pos, freqs, heads)
            out = torch.empty_like(x)
            with gpu_configs.recording(ar_kernels._ar_stack_decode_kernel) as seen:
                ar_launch(x, wc, cache, pos, freqs, heads, out, config=cfg)
            assert len(seen) == 1 and seen[0]["grid"] == (-(-bsz // BM),), f"sm_{arch}: {seen}"
            gpu_configs.check_gpu_options(seen[0], cfg)
            assert gpu_configs.launched_path("_ar_stack_decode_kernel", seen[0]) == path
            return out

        check_steps(xs, w, freqs, H, positions=set(positions), step=step)


# ---- coverage --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,paths", [("_mar_stack_kernel", mar_paths), ("_ar_stack_decode_kernel", ar_paths)])
def test_every_aot_configuration_is_exercised(kernel, paths):
    """Every (sm_90, sm_80) launch of the AOT capture list has its code path among the cases above; and the cases
    take the masked variant too."""
    exercised = paths()
    assert not gpu_configs.missing(kernel, exercised), gpu_configs.missing(kernel, exercised)
    assert {p for p in exercised if ("EVEN", False) in p}, "no masked (EVEN=False) case"
