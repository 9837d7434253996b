"""ar_block_stack_decode: the fused AR block stack decode step (Triton, interpreter on CPU) against its reference,
and the reference against the AR level's own modules on the engine's torch path.

Numerics (issue #27; ``tests/fractal_kernels/numerics.py``): the kernel is compared with the reference run in
float64 with the kernel's rounding points (linear inputs to the weight dtype, cache writes to the cache dtype,
the output to x's dtype), one step at a time, each step starting from the reference's cache, so neither the
CPU's fp32 summation order nor one rounding flip carried into later steps can decide a result. Per step:
outputs (LayerNorm outputs, O(1)) and the cache slot written agree to atol = rtol = 2e-5 (fp32 kernel vs exact)
except, with 16-bit weights or cache, at most 30 % of the rows (at least one; of the elements for a 16-bit
output) off by rounding flips: <= 1 ulp of a 16-bit value's dtype, <= 2 ulps of the weight dtype for fp32 values,
at max(|value|, 1). fp32 weights and
cache: no row may differ. Reference vs the modules in
fp32: atol = rtol = 1e-5. The kernel's cache positions after ``pos`` are NaN when it runs: a read of a slot not
yet written shows up as NaN.
"""
import functools

import pytest
import torch

from fractal_kernels.dispatch import BackendUnavailable, last_backend
from fractal_kernels.ops.ar_stack import ar_block_stack_decode, ar_stack_cache, pack_ar_stack
from fractal_kernels.reference.ar_stack import ar_block_stack_decode_reference
from fractal_models.ar import ModelArgs, TransformerBlock, precompute_freqs_cis_2d
from fractal_models.engine.ar import _attend_step, _rms_norm
from fractal_models.ar import KVCache

from tests.fractal_kernels.numerics import FLIP_ULPS, allowed_rows, check_flips

FP32 = dict(atol=2e-5, rtol=2e-5)
STEPS = 3


@functools.lru_cache(maxsize=None)
def level(dim: int, heads: int, depth: int, seed: int = 0):
    """(blocks, final LayerNorm, RoPE table [5, HD/2, 2]) with every parameter random (the default init makes the
    norms identities and the attention near-uniform); linears of unit gain, so that a 16-bit rounding flip (see
    the module docstring) is not amplified block after block."""
    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList([TransformerBlock(ModelArgs(dim=dim, n_head=heads)) for _ in range(depth)]).eval()
    norm = torch.nn.LayerNorm(dim, eps=1e-6)
    with torch.no_grad():
        for p in list(blocks.parameters()) + list(norm.parameters()):
            p.normal_(0, p.shape[1] ** -0.5 if p.dim() == 2 else 0.5)  # unit gain per linear
            if p.dim() == 1:
                p.add_(1.0)
    # rows 1.. of the model's 2x2-grid table (row 0, the condition token's, is all zeros) and a random row
    freqs = torch.cat([precompute_freqs_cis_2d(2, dim // heads)[1:], torch.randn(1, dim // heads // 2, 2)])
    return blocks, norm, freqs.contiguous()


def _run(x_steps, w, freqs, heads, backend, cache_dtype=torch.float32):
    cache = ar_stack_cache(w, x_steps[0].shape[0], len(freqs), "cpu", cache_dtype)
    outs = [ar_block_stack_decode(x, w, cache, pos, freqs, heads, backend=backend) for pos, x in enumerate(x_steps)]
    return outs, cache


def _flip_dtype(*dtypes):
    """The narrowest storage dtype on the way (where a flip can happen), fp32 if none."""
    small = [d for d in dtypes if d != torch.float32]
    return small[0] if small else torch.float32


def check_steps(x_steps, w, freqs, heads, cache_dtype=torch.float32, backend="triton", positions=None,
                step=None):
    """Each step of the kernel from the fp64 reference's cache, against that reference's step (module
    docstring); returns the number of (step, output or cache) checks that saw a flip. ``positions``: the steps
    the kernel runs (default all; the reference runs every step to fill its cache); ``step(x, w, cache, pos,
    freqs, heads)``: the kernel call (default the public op with ``backend``). Tensors live on x's device."""
    bsz = x_steps[0].shape[0]
    ref_cache = ar_stack_cache(w, bsz, len(freqs), x_steps[0].device, cache_dtype)
    wdtype = w.wqkv.dtype
    seen = 0
    for pos, x in enumerate(x_steps):
        if positions is not None and pos not in positions:
            ar_block_stack_decode_reference(x, w, ref_cache, pos, freqs, heads, compute_dtype=torch.float64)
            continue
        cache = torch.full_like(ref_cache, float("nan"))
        cache[:, :, :, :pos] = ref_cache[:, :, :, :pos]
        if step is None:
            got = ar_block_stack_decode(x, w, cache, pos, freqs, heads, backend=backend)
        else:
            got = step(x, w, cache, pos, freqs, heads)
        want = ar_block_stack_decode_reference(x, w, ref_cache, pos, freqs, heads, compute_dtype=torch.float64)
        assert got.dtype == x.dtype and got.shape == x.shape
        exact16 = dict(atol=0.0, rtol=0.0) if x.dtype != torch.float32 else FP32
        out_flip = _flip_dtype(x.dtype, wdtype, cache_dtype)
        rows = 0 if out_flip == torch.float32 else allowed_rows(bsz)
        per = (-1, 1) if x.dtype != torch.float32 else got.shape  # a 16-bit output's last rounding: per element
        r = check_flips(got.reshape(per), want.reshape(per), **exact16, flip_dtype=out_flip,
                        max_rows=0 if rows == 0 else allowed_rows(got.reshape(per).shape[0]),
                        max_ulps=1.0 if x.dtype != torch.float32 else FLIP_ULPS, what=f"output at pos {pos}")
        # the slot written this step: [NB, 2, B, D] -> rows (block, k/v, row)
        tol = dict(atol=0.0, rtol=0.0) if cache_dtype != torch.float32 else FP32
        slot, ref_slot = cache[:, :, :, pos], ref_cache[:, :, :, pos]
        c = check_flips(slot, ref_slot, **tol, flip_dtype=_flip_dtype(cache_dtype, wdtype),
                        max_rows=0 if rows == 0 else allowed_rows(slot[..., 0].numel()),
                        max_ulps=1.0 if cache_dtype != torch.float32 else FLIP_ULPS, what=f"cache at pos {pos}")
        assert torch.isnan(cache[:, :, :, pos + 1:]).all(), "the step wrote past its position"
        seen += bool(r["rows"]) + bool(c["rows"])
    return seen


# (D, heads) x weight dtype x batch in full; depth alternates 1, 2 (each interpreted step costs ~0.3 s)
CASES = [(d, h, dt, b, 1 + i % 2)
         for i, (d, h, dt, b) in enumerate([(d, h, dt, b) for d, h in ((32, 2), (48, 3), (64, 4))
                                            for dt in (torch.float32, torch.bfloat16, torch.float16)
                                            for b in (1, 2, 17)])]


@pytest.mark.parametrize("dim,heads,wdtype,bsz,depth", CASES)
def test_kernel_matches_reference_over_steps(dim, heads, wdtype, bsz, depth):
    blocks, norm, freqs = level(dim, heads, depth)
    w = pack_ar_stack(blocks, norm, wdtype)
    g = torch.Generator().manual_seed(bsz)
    xs = [torch.randn(bsz, dim, generator=g) for _ in range(STEPS)]
    check_steps(xs, w, freqs, heads)
    assert last_backend("ar_block_stack_decode") == "triton"


def test_bf16_input_and_cache_and_all_positions():
    # x in bf16 (out in bf16), a bf16 cache, every position of the cache up to its length
    blocks, norm, freqs = level(32, 2, 2)
    w = pack_ar_stack(blocks, norm, torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 32, generator=g).bfloat16() for _ in range(len(freqs))]
    check_steps(xs, w, freqs, 2, torch.bfloat16)


def test_chained_steps_on_one_cache_stay_close():
    """The steps chained on the kernel's own cache (as the engine runs them), fp32 weights: no rounding flips
    to propagate, so the chain matches the fp64 reference's chain to fp32 accuracy."""
    blocks, norm, freqs = level(48, 3, 2)
    w = pack_ar_stack(blocks, norm, torch.float32)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3, 48, generator=g) for _ in range(len(freqs))]
    got, cache = _run(xs, w, freqs, 3, "triton")
    ref_cache = ar_stack_cache(w, 3, len(freqs), "cpu")
    for pos, (x, o) in enumerate(zip(xs, got)):
        want = ar_block_stack_decode_reference(x, w, ref_cache, pos, freqs, 3, compute_dtype=torch.float64)
        check_flips(o, want, **FP32, flip_dtype=torch.float32, max_rows=0, what=f"chained output at pos {pos}")
    check_flips(cache, ref_cache, **FP32, flip_dtype=torch.float32, max_rows=0, what="chained cache")


def test_reference_matches_engine_torch_path():
    # the AR level's blocks on the fast engine's torch path (fractal_models/engine/ar.py: _rms_norm, _attend_step,
    # the modules' KV caches), step by step, then the level's norm
    dim, heads, depth, bsz = 48, 3, 2, 3
    blocks, norm, freqs = level(dim, heads, depth)
    w = pack_ar_stack(blocks, norm, torch.float32)
    cache = ar_stack_cache(w, bsz, len(freqs), "cpu")
    for b in blocks:
        b.attention.kv_cache = KVCache(bsz, len(freqs), heads, dim // heads, "cpu", torch.float32, freqs_cis=freqs)
    g = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for pos in range(len(freqs)):
                x = torch.randn(bsz, dim, generator=g)
                h = x[:, None]
                cos, sin = freqs[pos:pos + 1].unbind(-1)
                for b in blocks:
                    h = h + _attend_step(b.attention, _rms_norm(b.attention_norm, h), pos, cos, sin)
                    h = h + b.feed_forward.ffn(_rms_norm(b.ffn_norm, h))
                want = norm(h)[:, 0]
                got = ar_block_stack_decode_reference(x, w, cache, pos, freqs, heads)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        for b in blocks:
            b.attention.kv_cache = None


def test_auto_is_torch_on_cpu():
    blocks, norm, freqs = level(32, 2, 1)
    w = pack_ar_stack(blocks, norm, torch.float32)
    x = torch.randn(2, 32)
    out = ar_block_stack_decode(x, w, ar_stack_cache(w, 2, len(freqs), "cpu"), 0, freqs, 2)
    assert last_backend("ar_block_stack_decode") == "torch"
    with pytest.raises(BackendUnavailable, match="no 'cuda' kernel|backend 'cuda'"):
        ar_block_stack_decode(x, w, ar_stack_cache(w, 2, len(freqs), "cpu"), 0, freqs, 2, backend="cuda")
    assert out.shape == (2, 32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    blocks, norm, freqs = level(32, 2, 1)
    w = pack_ar_stack(blocks, norm, torch.float32)
    out = ar_block_stack_decode(torch.empty(0, 32), w, ar_stack_cache(w, 0, len(freqs), "cpu"), 1, freqs, 2,
                                backend=backend)
    assert out.shape == (0, 32) and out.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_row_stays_in_its_row():
    blocks, norm, freqs = level(32, 2, 2)
    w = pack_ar_stack(blocks, norm, torch.float32)
    x = torch.randn(3, 32)
    x[1, 5] = float("nan")
    out, _ = _run([x, torch.randn(3, 32)], w, freqs, 2, "triton")
    for o in out:
        assert torch.isnan(o[1]).all() and torch.isfinite(o[[0, 2]]).all()


def test_input_checks():
    blocks, norm, freqs = level(32, 2, 2)
    w = pack_ar_stack(blocks, norm, torch.float32)
    x = torch.randn(2, 32)
    cache = ar_stack_cache(w, 2, len(freqs), "cpu")
    call = functools.partial(ar_block_stack_decode, backend="torch")
    with pytest.raises(ValueError, match="x: expected a float"):
        call(torch.randn(2, 1, 32), w, cache, 0, freqs, 2)
    with pytest.raises(ValueError, match=r"weights.wqkv: expected .*shape \(2, 144, 48\)"):
        call(torch.randn(2, 48), w, cache, 0, freqs, 2)
    with pytest.raises(ValueError, match="pos: expected an int in \\[0, 5\\)"):
        call(x, w, cache, 5, freqs, 2)
    with pytest.raises(ValueError, match="pos: expected an int"):
        call(x, w, cache, -1, freqs, 2)
    with pytest.raises(ValueError, match="pos: expected an int in \\[0, 3\\)"):
        call(x, w, ar_stack_cache(w, 2, 3, "cpu"), 3, freqs, 2)
    with pytest.raises(ValueError, match="cache: expected"):
        call(x, w, ar_stack_cache(w, 3, len(freqs), "cpu"), 0, freqs, 2)
    with pytest.raises(ValueError, match="cache: expected"):
        call(x, w, cache.transpose(3, 4), 0, freqs, 2)
    with pytest.raises(ValueError, match="num_heads: expected"):
        call(x, w, cache, 0, freqs, 3)
    with pytest.raises(ValueError, match="freqs_cis: expected"):
        call(x, w, cache, 0, freqs[:, :4], 2)
    with pytest.raises(ValueError, match="freqs_cis: expected"):
        call(x, w, cache, 0, freqs.double(), 2)
    with pytest.raises(TypeError, match="weights: expected an ArStackWeights"):
        call(x, list(w), cache, 0, freqs, 2)
    with pytest.raises(ValueError, match="weights.attn_norm: expected fp32"):
        call(x, w._replace(attn_norm=w.attn_norm.half()), cache, 0, freqs, 2)
    with pytest.raises(ValueError, match="weights.wo: expected every linear weight"):
        call(x, w._replace(wo=w.wo.half()), cache, 0, freqs, 2)
    with pytest.raises(ValueError, match="dtype: expected"):
        pack_ar_stack(blocks, norm, torch.float64)
    with pytest.raises(ValueError, match="max_len: expected"):
        ar_stack_cache(w, 2, 0, "cpu")
