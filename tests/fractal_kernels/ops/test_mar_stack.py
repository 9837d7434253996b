"""The fused MAR block stack: the Triton kernel (interpreter on CPU) against the reference, the reference against
the model's own blocks, input checks and edge cases.

Tolerances (abs error on the final LayerNorm's output, values O(1); max / mean): fp32 weights 1e-5 / 1e-6 (fp32
"ieee" dots, another summation order; seen 4e-6 / 5e-7); fp16 3e-3 / 2e-4 and bf16 3e-2 / 5e-4: both sides round
every linear's input to the weight dtype, and a value within reach of a rounding boundary may round the other way
after a different fp32 summation order (one 16-bit ulp at that element, spread by the attention to its whole
sequence; seen 5e-4 / 1e-4 fp16, 3e-5 / 4e-7 bf16). The means sit well under the 16-bit rounding's own effect
(vs fp32 weights: 6e-4 fp16, 4e-3 bf16), so a systematic error (a truncating cast: 5e-3 mean in bf16, a missing
bias) fails.
"""
import math

import pytest
import torch
import torch.nn as nn

from fractal_kernels import dispatch
from fractal_kernels.ops.mar_stack import (MarStackWeights, mar_block_stack, mar_block_stack_reference,
                                           pack_mar_stack)
from fractal_models.mar import Block

TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (3e-3, 2e-4), torch.bfloat16: (3e-2, 5e-4)}


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


def close(y, r, dtype):
    amax, amean = TOL[dtype]
    err = (y.float() - r.float()).abs()
    assert torch.isfinite(y).all()
    assert err.max() <= amax, f"max abs error {err.max():.3g} > {amax}"
    assert err.mean() <= amean, f"mean abs error {err.mean():.3g} > {amean}"


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
    close(y, mar_block_stack_reference(x, w, H), dtype)


@pytest.mark.parametrize("N,L", [(1, 1), (3, 1), (3, 5), (1, 22), (2, 17), (1, 64)])
def test_kernel_lengths_and_batches(N, L):
    # one row, padded rows (L -> 16, 32, 64), the longest sequence the kernel takes; every sequence its own
    blocks, norm = make_stack(40, 2, 1, seed=3)
    w = pack_mar_stack(blocks, norm, torch.float32)
    x = torch.randn(N, L, 40, generator=torch.Generator().manual_seed(N * 100 + L))
    y = mar_block_stack(x, w, 2, backend="triton")
    close(y, mar_block_stack_reference(x, w, 2), torch.float32)
    if N > 1:  # a sequence does not see the others
        close(mar_block_stack(x[1:2], w, 2, backend="triton"), y[1:2], torch.float32)


def test_kernel_without_qkv_bias_and_16bit_activations():
    blocks, norm = make_stack(32, 2, 2, seed=5, qkv_bias=False)
    w = pack_mar_stack(blocks, norm, torch.bfloat16)
    assert torch.equal(w.qkv_b, torch.zeros(2, 96))
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = mar_block_stack(x, w, 2, backend="triton")
    assert y.dtype == torch.bfloat16
    close(y, mar_block_stack_reference(x, w, 2), torch.bfloat16)


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
    close(mar_block_stack(x, w, 2, backend="triton"), want, torch.float32)
    close(mar_block_stack_reference(x, w, 2), want, torch.float32)


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
    close(y[1], r[1], torch.float32)


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
