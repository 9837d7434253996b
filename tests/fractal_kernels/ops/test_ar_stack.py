"""ar_block_stack_decode: the fused AR block stack decode step (Triton, interpreter on CPU) against its reference,
and the reference against the AR level's own modules on the engine's torch path.

Tolerances (outputs are LayerNorm outputs, O(1)): fp32 weights atol = rtol = 2e-5 (fp32 GEMM / reduction order,
online vs two-pass softmax); 16-bit weights: both sides round each linear's input to the weight dtype, so they
differ only where an fp32 summation-order difference flips a rounding: max atol = rtol 1e-2 (bf16) / 2e-3 (fp16)
for the rare flip (observed <= 4e-4) and a mean absolute error under 5e-4 (observed ~1e-7 .. 1e-4: one row
in 17 with a flip). Reference vs the modules in fp32:
atol = rtol = 1e-5. Each case runs several steps in sequence on one cache, so a wrong cache write or position
shows up in the later steps.
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

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
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


def _close(got, want, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if dtype != torch.float32:
        assert (got.float() - want.float()).abs().mean() < 5e-4


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
    want, cache_want = _run(xs, w, freqs, heads, "torch")
    got, cache_got = _run(xs, w, freqs, heads, "triton")
    assert last_backend("ar_block_stack_decode") == "triton"
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == (bsz, dim)
        _close(a, b, wdtype)
    _close(cache_got[:, :, :, :STEPS], cache_want[:, :, :, :STEPS], wdtype)


def test_bf16_input_and_cache_and_all_positions():
    # x in bf16 (out in bf16), a bf16 cache, every position of the cache up to its length
    blocks, norm, freqs = level(32, 2, 2)
    w = pack_ar_stack(blocks, norm, torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 32, generator=g).bfloat16() for _ in range(len(freqs))]
    want, cw = _run(xs, w, freqs, 2, "torch", torch.bfloat16)
    got, cg = _run(xs, w, freqs, 2, "triton", torch.bfloat16)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        _close(a.float(), b.float(), torch.bfloat16)
    _close(cg.float(), cw.float(), torch.bfloat16)


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
