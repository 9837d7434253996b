"""The fused MAR block stack: the Triton kernel (interpreter on CPU) against the reference, the reference against
the model's own blocks, input checks and edge cases.

Numerics (issue #27; ``tests/fractal_kernels/numerics.py``): the kernel is compared with the reference run in
float64 with the kernel's rounding points (each linear's input to the weight dtype, the output to x's dtype), so
the CPU's fp32 summation order cannot decide a result. Values are the final LayerNorm's output, O(1); rows are
tokens. fp32 weights: every element within atol = rtol = 1e-5 (seen 1e-6). 16-bit weights, one block: at most
30 % of the token rows (at least one) carry a rounding flip (a value near a 16-bit midpoint rounded the other way
by the kernel's fp32 sums: seen <= 9 % bf16/fp16, the fp32 reference with permuted sums <= 14 %), each element
within 2 ulps of the weight dtype at max(|v|, 1) (seen 0.9); a 16-bit output: at most 30 % of its elements 1 ulp of
its dtype off (its last rounding meets the flips upstream). Two or more 16-bit blocks: the second block's attention
carries the first block's flips to every token of the sequence (seen up to 84 % of the rows with fp16), so only
the size is bounded there, 3 ulps (seen 1.97). A reference that truncates instead of rounding fails the one-block
check (every row, >= 4.9 ulps; ``tests/fractal_kernels/test_numerics.py``); the two-block cases check the
chaining, the one-block cases the roundings.
"""

import pytest
import torch
import torch.nn as nn

from fractal_kernels import dispatch
from fractal_kernels.ops.mar_stack import (MarStackWeights, mar_block_stack, mar_block_stack_reference,
                                           pack_mar_stack)
from fractal_models.mar import Block

from tests.fractal_kernels.numerics import FLIP_ULPS, allowed_rows, check_flips

FP32 = dict(atol=1e-5, rtol=1e-5)


def make_stack(D, H, depth, seed=0, qkv_bias=True):
    g = torch.Generator().manual_seed(seed)
    blocks = nn.ModuleList([Block(D, H, qkv_bias=qkv_bias) for _ in range(depth)])
    norm = nn.LayerNorm(D, eps=1e-6)
    with torch.no_grad():
        for p in list(blocks.parameters()) + list(norm.parameters()):
            # weights big enough that attention is not uniform and the MLP matters; LN params around 1 / 0
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.2))
        for b in blocks:
            b.norm1.weight.add_(1.0)
            b.norm2.weight.add_(1.0)
        norm.weight.add_(1.0)
    return blocks.eval(), norm.eval()


def close(y, r):
    """fp32 against fp32 (the kernel against itself, or a plain LayerNorm)."""
    assert torch.isfinite(y).all()
    check_flips(y, r, **FP32, flip_dtype=torch.float32, max_rows=0)


def close_to_reference(y, x, w, num_heads):
    """``y`` (the kernel's) against the fp64 reference with the kernel's roundings (module docstring)."""
    want = mar_block_stack_reference(x, w, num_heads, compute_dtype=torch.float64)
    assert y.shape == want.shape and y.dtype == want.dtype and torch.isfinite(y).all()
    wdtype, depth = w.qkv_w.dtype, w.qkv_w.shape[0]
    if wdtype == torch.float32 and x.dtype == torch.float32:
        return check_flips(y, want, **FP32, flip_dtype=torch.float32, max_rows=0)
    out16 = x.dtype != torch.float32
    rows = y.numel() if out16 else y[..., 0].numel()  # a 16-bit output's last rounding: per element
    return check_flips(y.reshape(rows, -1), want.reshape(rows, -1),
                       **(dict(atol=0.0, rtol=0.0) if out16 else FP32), flip_dtype=x.dtype if out16 else wdtype,
                       max_rows=allowed_rows(rows) if depth <= 1 else rows,
                       max_ulps=(1.0 if out16 else FLIP_ULPS) if depth <= 1 else 3.0)


SHAPES = [(32, 2), (48, 3), (40, 2)]  # (D, heads): head dims 16, 16, 20 (not a power of two: masked chunks)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,H", SHAPES)
@pytest.mark.parametrize("depth,N,L", [(1, 3, 22), (2, 1, 5)])
def test_kernel_matches_reference(D, H, depth, N, L, dtype):
    blocks, norm = make_stack(D, H, depth, seed=D + depth)
    w = pack_mar_stack(blocks, norm, dtype)
    x = torch.randn(N, L, D, generator=torch.Generator().manual_seed(1))
    y = mar_block_stack(x, w, H, backend="triton")
    assert dispatch.last_backend("mar_block_stack") == "triton"
    assert y.shape == x.shape and y.dtype == x.dtype
    close_to_reference(y, x, w, H)


@pytest.mark.parametrize("N,L", [(1, 1), (3, 1), (3, 5), (1, 22), (2, 17), (1, 64)])
def test_kernel_lengths_and_batches(N, L):
    # one row, padded rows (L -> 16, 32, 64), the longest sequence the kernel takes; every sequence its own
    blocks, norm = make_stack(40, 2, 1, seed=3)
    w = pack_mar_stack(blocks, norm, torch.float32)
    x = torch.randn(N, L, 40, generator=torch.Generator().manual_seed(N * 100 + L))
    y = mar_block_stack(x, w, 2, backend="triton")
    close_to_reference(y, x, w, 2)
    if N > 1:  # a sequence does not see the others
        close(mar_block_stack(x[1:2], w, 2, backend="triton"), y[1:2])


def test_kernel_without_qkv_bias_and_16bit_activations():
    blocks, norm = make_stack(32, 2, 2, seed=5, qkv_bias=False)
    w = pack_mar_stack(blocks, norm, torch.bfloat16)
    assert torch.equal(w.qkv_b, torch.zeros(2, 96))
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = mar_block_stack(x, w, 2, backend="triton")
    assert y.dtype == torch.bfloat16
    close_to_reference(y, x, w, 2)


def test_reference_equals_the_model_blocks():
    # the reference on fp32 weights is blocks_eval (the engine's op-by-op stack) of a MAR level
    from fractal_models.mar import MAR
    torch.manual_seed(0)
    m = MAR(seq_len=16, patch_size=1, cond_embed_dim=24, embed_dim=48, num_blocks=2, num_heads=3,
            attn_dropout=0.0, proj_dropout=0.0, num_conds=5).eval()
    x = torch.randn(3, 21, 48)
    w = pack_mar_stack(m.blocks, m.norm, torch.float32)
    with torch.no_grad():
        want = m.blocks_eval(x)
        torch.testing.assert_close(mar_block_stack_reference(x, w, 3), want, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(mar_block_stack(x, w, 3, backend="torch"), want, atol=2e-6, rtol=1e-5)
    # 16-bit packing is what autocast rounds: far from fp32 by more than the fp32 tolerance, so the cast happens
    w16 = pack_mar_stack(m.blocks, m.norm, torch.bfloat16)
    assert w16.qkv_w.dtype == torch.bfloat16 and w16.qkv_b.dtype == torch.float32 and w16.eps == 1e-6
    err = (mar_block_stack_reference(x, w16, 3) - want).abs().max()
    assert 1e-4 < err < 0.2


def test_depth_zero_is_the_final_norm():
    blocks, norm = make_stack(32, 2, 0)
    w = pack_mar_stack(blocks, norm, torch.float32)
    x = torch.randn(2, 5, 32)
    want = torch.nn.functional.layer_norm(x, (32,), norm.weight, norm.bias, 1e-6).detach()
    close(mar_block_stack(x, w, 2, backend="triton"), want)
    close(mar_block_stack_reference(x, w, 2), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    blocks, norm = make_stack(32, 2, 1)
    w = pack_mar_stack(blocks, norm, torch.float32)
    y = mar_block_stack(torch.randn(0, 5, 32), w, 2, backend=backend)
    assert y.shape == (0, 5, 32) and y.dtype == torch.float32


def test_nan_spreads_to_its_sequence_only():
    blocks, norm = make_stack(32, 2, 1)
    w = pack_mar_stack(blocks, norm, torch.float32)
    x = torch.randn(2, 5, 32)
    x[0, 3, 7] = float("nan")
    y = mar_block_stack(x, w, 2, backend="triton")
    r = mar_block_stack_reference(x, w, 2)
    assert torch.isnan(y[0]).all() and torch.isnan(r[0]).all()  # attention reaches every token of the sequence
    close(y[1], r[1])


def test_auto_on_cpu_is_torch():
    blocks, norm = make_stack(32, 2, 1)
    w = pack_mar_stack(blocks, norm, torch.float32)
    x = torch.randn(1, 5, 32)
    y = mar_block_stack(x, w, 2)
    assert dispatch.last_backend("mar_block_stack") == "torch"
    assert torch.equal(y, mar_block_stack_reference(x, w, 2))


def test_bad_input_names_the_argument():
    blocks, norm = make_stack(32, 2, 1)
    w = pack_mar_stack(blocks, norm, torch.float32)
    x = torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match=r"x: expected an \[N, L, D\]"):
        mar_block_stack(x[0], w, 2)
    with pytest.raises(ValueError, match="x: expected last dim D=32"):
        mar_block_stack(torch.randn(1, 5, 16), w, 2)
    with pytest.raises(ValueError, match="x: expected a floating-point"):
        mar_block_stack(torch.ones(1, 5, 32, dtype=torch.long), w, 2)
    with pytest.raises(ValueError, match="num_heads: expected a positive int dividing the width D=32"):
        mar_block_stack(x, w, 3)
    with pytest.raises(ValueError, match="num_heads"):
        mar_block_stack(x, w, 0)
    with pytest.raises(ValueError, match="weights: expected a MarStackWeights"):
        mar_block_stack(x, list(w), 2)
    with pytest.raises(ValueError, match=r"weights.fc2_w: expected shape \(1, 32, 128\)"):
        mar_block_stack(x, w._replace(fc2_w=w.fc2_w[:, :, :64].contiguous()), 2)
    with pytest.raises(ValueError, match="weights.proj_w: expected dtype torch.float32"):
        mar_block_stack(x, w._replace(proj_w=w.proj_w.half()), 2)
    with pytest.raises(ValueError, match="weights.qkv_b: expected dtype torch.float32"):
        mar_block_stack(x, w._replace(qkv_b=w.qkv_b.half()), 2)
    with pytest.raises(ValueError, match="weights.qkv_w: dtype torch.float64 unsupported"):
        mar_block_stack(x, w._replace(**{k: getattr(w, k).double() for k in ("qkv_w", "proj_w", "fc1_w",
                                                                                "fc2_w")}), 2)
    with pytest.raises(ValueError, match="x: sequence length L=65 over the triton kernel's limit 64"):
        mar_block_stack(torch.randn(1, 65, 32), w, 2, backend="triton")
    # the torch backend takes any length
    assert mar_block_stack(torch.randn(1, 65, 32), w, 2, backend="torch").shape == (1, 65, 32)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        pack_mar_stack(blocks, norm, torch.float64)
    blocks[0].norm2.eps = 1e-5
    with pytest.raises(ValueError, match=r"blocks\[0\].norm2: eps"):
        pack_mar_stack(blocks, norm, torch.float32)
