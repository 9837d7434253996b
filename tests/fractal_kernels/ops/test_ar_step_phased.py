"""The phased AR decode step (``ar_block_stack_decode(schedule="phases")``: ``_ar_step_phased_kernel``, a launch
per phase) against the op's fp64 reference, under the interpreter's configuration and the configurations a GPU
runs (every AOT code path), plus poisoned scratch, the schedule choice and errors.

Numerics and tolerances: ``test_ar_stack.py``'s ``check_steps`` (each step from the reference's cache, fp32 vs the
fp64 reference with the kernel's rounding points; rounding flips allowed only with 16-bit weights or cache, on
at most 30 % of the rows, <= 1-2 ulps). The persistent schedule (``BARRIER=True``) is the same code between grid
barriers and cannot run in the interpreter (programs run one after another): the GPU session checks it.
"""
from __future__ import annotations

import pytest
import torch

from fractal_kernels import _scratch
from fractal_kernels.dispatch import last_backend
from fractal_kernels.ops.ar_stack import ar_block_stack_decode, ar_stack_cache, pack_ar_stack
from fractal_kernels.ops.ar_stack import phased_kernels
from fractal_kernels.reference.ar_stack import ar_block_stack_decode_reference
from fractal_kernels.ops.ar_stack.phased import (ArStepConfig, ar_step_config, launch_phased, phase_count,
                                                 phase_items, phase_kind)

from tests.fractal_kernels import gpu_configs
from tests.fractal_kernels.ops.test_ar_stack import check_steps, level

KERNEL = "_ar_step_phased_kernel"
CPU = torch.device("cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _inputs(dim, bsz, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed + bsz)
    return [torch.randn(bsz, dim, generator=g) for _ in range(steps)]


@pytest.mark.parametrize("dim,heads,wdtype,bsz,depth", [
    (32, 2, F32, 1, 1), (32, 2, BF16, 2, 2), (48, 3, F16, 17, 1), (64, 4, BF16, 3, 2), (48, 3, F32, 2, 2)])
def test_phases_match_the_reference_over_steps(dim, heads, wdtype, bsz, depth):
    """The public op with ``schedule="phases"`` (the interpreter's configuration: 64-column items, whole-K)."""
    blocks, norm, freqs = level(dim, heads, depth)
    w = pack_ar_stack(blocks, norm, wdtype)
    check_steps(_inputs(dim, bsz), w, freqs, heads, step=lambda x, w, c, p, f, h: ar_block_stack_decode(
        x, w, c, p, f, h, backend="triton", schedule="phases"))
    assert last_backend("ar_step_schedule") == "phases"


def test_bf16_input_and_cache():
    blocks, norm, freqs = level(32, 2, 2)
    w = pack_ar_stack(blocks, norm, BF16)
    xs = [x.bfloat16() for x in _inputs(32, 2, len(freqs), seed=3)]
    check_steps(xs, w, freqs, 2, BF16, step=lambda x, w, c, p, f, h: ar_block_stack_decode(
        x, w, c, p, f, h, backend="triton", schedule="phases"))


def test_phase_table():
    K = phased_kernels
    kinds = [phase_kind(p, 2) for p in range(phase_count(2))]
    assert phase_count(2) == 12 and kinds == [K.INIT, K.QKV, K.ATT, K.WO, K.W13, K.W2, K.QKV, K.ATT, K.WO, K.W13,
                                              K.W2, K.FINAL]
    cfg = ar_step_config(512, 1536, 64, 2, CPU, arch=90, interpret=False)
    assert (cfg.br, cfg.bn, cfg.bk, cfg.num_warps) == (2, 8, 512, 8)
    # fractalar_in64's level 1 at batch 1 with CFG: D=512, 8 heads, hidden 1536, 2 rows
    assert [phase_items(k, cfg, 512, 1536, 8, 2) for k in range(7)] == [192, 16, 64, 192, 64, 1, 1]


# ---------------------------------------------------------------- the GPU's configurations

# (D, heads, weight dtype, rows, depth, arches): the items' column count and K chunk follow the widest phase, so
# each AOT code path (BR, BN, BK, KB, ROUND) of fractalar_in64's levels runs at a width that gives it (sm_90 and
# sm_80 take the same ones): D=512 at batch 1 (2 rows: 8 columns, K chunk 512), D=768 for D=1024 at batch 1 (16
# columns, K chunk 256), D=384 for batch 8 (16 rows: 8 columns, K chunk 64)
GPU_CASES = [(512, 8, BF16, 2, 1, (90, 80)), (512, 8, F32, 2, 1, (90, 80)), (768, 12, F16, 2, 1, (90, 80)),
             (384, 6, BF16, 16, 1, (90, 80))]


def _path(cfg, wdtype, barrier=False):
    return gpu_configs.code_path(KERNEL, str(wdtype)[6:], dict(BR=cfg.br, BN=cfg.bn, BK=cfg.bk, KB=cfg.kb,
                                                              ROUND={F32: 0, BF16: 1, F16: 2}[wdtype],
                                                              BARRIER=barrier))


def _configs(dim, heads, wdtype, rows, hidden, arches):
    paths = gpu_configs.by_path(ar_step_config, lambda cfg: _path(cfg, wdtype), dim, hidden, dim // heads, rows)
    return {p: [(a, c) for a, c in v if a in arches] for p, v in paths.items() if any(a in arches for a, _ in v)}


def _id(c):
    return f"D{c[0]}-H{c[1]}-{str(c[2])[6:]}-rows{c[3]}-sm" + "_".join(map(str, c[5]))


@pytest.mark.parametrize("case", GPU_CASES, ids=_id)
def test_phased_gpu_configs(case, kernel_device):
    dim, heads, wdtype, rows, depth, arches = case
    blocks, norm, freqs = level(dim, heads, depth)
    w = pack_ar_stack(blocks, norm, wdtype)
    hidden = w.w1.shape[1]
    dev = kernel_device
    wd = type(w)(*(t.to(dev) if isinstance(t, torch.Tensor) else t for t in w))
    for path, ((arch, cfg), *_) in _configs(dim, heads, wdtype, rows, hidden, arches).items():
        seen_all = []

        def step(x, w, cache, pos, f, h):
            out = torch.empty_like(x)
            with gpu_configs.recording(phased_kernels._ar_step_phased_kernel) as seen:
                launch_phased(x, wd, cache.to(dev), pos, f.to(dev), h, out, config=cfg, max_programs=3)
            seen_all.extend(seen)
            return out

        xs = [x.to(dev) for x in _inputs(dim, rows)]
        if dim <= 512:  # a cache position 2 steps in (the attention's online softmax over 3 keys)
            check_steps(xs, wd, freqs.to(dev), heads, positions=[2], step=step)
        else:
            _check_wide(xs, wd, freqs.to(dev), heads, step)
        assert len(seen_all) == phase_count(depth)
        for launch in seen_all:
            gpu_configs.check_gpu_options(launch, cfg)
            assert gpu_configs.launched_path(KERNEL, launch) == path, f"sm_{arch}"


def _check_wide(xs, w, freqs, heads, step):
    """D = 1024 with 16-bit weights: a row has thousands of values rounded to the weight dtype, so rounding flips
    against the fp64 reference are certain and add up (PyTorch's own fp32 evaluation of the reference is ~2e-4
    off); the kernel must stay within 4x of that distance (a wrong index or mask is O(1) off) and write the cache
    slot within the same bound."""
    bsz = xs[0].shape[0]
    cache64 = ar_stack_cache(w, bsz, len(freqs), xs[0].device)
    for pos in range(2):
        ar_block_stack_decode_reference(xs[pos], w, cache64, pos, freqs, heads, compute_dtype=torch.float64)
    cache32, cache_k = cache64.clone(), torch.full_like(cache64, float("nan"))
    cache_k[:, :, :, :2] = cache64[:, :, :, :2]
    want = ar_block_stack_decode_reference(xs[2], w, cache64, 2, freqs, heads, compute_dtype=torch.float64)
    torch32 = ar_block_stack_decode_reference(xs[2], w, cache32, 2, freqs, heads)
    got = step(xs[2], w, cache_k, 2, freqs, heads)
    bound = 4 * (torch32.double() - want.double()).abs().max().item() + 2e-5
    assert (got.double() - want.double()).abs().max().item() <= bound
    slot = (cache_k[:, :, :, 2].double() - cache64[:, :, :, 2].double()).abs().max().item()
    assert slot <= 4 * (cache32[:, :, :, 2].double() - cache64[:, :, :, 2].double()).abs().max().item() + 2e-5
    assert torch.isnan(cache_k[:, :, :, 3:]).all()


def test_every_aot_configuration_is_exercised():
    """Every phased AOT launch's code path is a case above, but the persistent one (``BARRIER=True``: GPU only)."""
    paths = set()
    for dim, heads, wdtype, rows, depth, arches in GPU_CASES:
        w = pack_ar_stack(*level(dim, heads, depth)[:2], wdtype)
        paths |= set(_configs(dim, heads, wdtype, rows, w.w1.shape[1], arches))
    missing = gpu_configs.missing(KERNEL, paths)
    barrier = [m for m in missing if "('BARRIER', True)" in m]
    assert barrier and sorted(missing) == sorted(barrier), missing


def test_scratch_is_written_before_it_is_read():
    """Every scratch element starts as NaN: the output and the cache slot are finite and bitwise those of a clean
    launch (the sm_90 configuration: 2-column items, padding rows)."""
    blocks, norm, freqs = level(32, 2, 2)
    w = pack_ar_stack(blocks, norm, BF16)
    x = _inputs(32, 3)[0]
    cfg = ar_step_config(32, w.w1.shape[1], 16, 3, CPU, arch=90, interpret=False)

    def run():
        cache = ar_stack_cache(w, 3, len(freqs), "cpu")
        out = torch.empty_like(x)
        launch_phased(x, w, cache, 0, freqs, 2, out, config=cfg, max_programs=2)
        return out, cache[:, :, :, 0]

    clean = run()
    with _scratch.poisoned():
        poisoned = run()
    for a, b in zip(clean, poisoned):
        assert torch.isfinite(b).all() and torch.equal(a, b)


def test_schedule_choice_and_errors(monkeypatch):
    blocks, norm, freqs = level(32, 2, 1)
    w = pack_ar_stack(blocks, norm, F32)
    x = _inputs(32, 2)[0]
    cache = ar_stack_cache(w, 2, len(freqs), "cpu")
    ar_block_stack_decode(x, w, cache, 0, freqs, 2, backend="triton")
    assert last_backend("ar_step_schedule") == "tiles"  # no GPU arch: the tile kernel
    monkeypatch.setenv("FRACTAL_AR_STEP_SCHEDULE", "phases")
    ar_block_stack_decode(x, w, cache, 0, freqs, 2, backend="triton")
    assert last_backend("ar_step_schedule") == "phases"
    monkeypatch.delenv("FRACTAL_AR_STEP_SCHEDULE")
    with pytest.raises(ValueError, match="schedule"):
        ar_block_stack_decode(x, w, cache, 0, freqs, 2, backend="triton", schedule="barrier")
    with pytest.raises(ValueError, match="schedule: 'persistent'.*CUDA"):
        ar_block_stack_decode(x, w, cache, 0, freqs, 2, backend="triton", schedule="persistent")
    with pytest.raises(ValueError, match="schedule: 'phases'.*backend 'torch'"):
        ar_block_stack_decode(x, w, cache, 0, freqs, 2, backend="torch", schedule="phases")
    with pytest.raises(ValueError, match="bn=3"):
        launch_phased(x, w, cache, 0, freqs, 2, torch.empty_like(x),
                      config=ArStepConfig(br=2, bn=3, bk=64, kb=16, num_warps=4, max_programs=2, maxnreg=None))
