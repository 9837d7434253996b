"""The reference attention against an independent formulation (PyTorch SDPA math) and fp64 gradients.

Tolerances: fp64 1e-12; fp32 2e-6 abs / 1e-5 rel (same math, different reduction order).
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fractal_kernels.reference import attention_reference

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=2e-6, rtol=1e-5)}


def sdpa(q, k, v, causal, scale=None):
    lq, lk = q.shape[-2], k.shape[-2]
    mask = None
    if causal:
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L", [1, 3, 4, 17, 21, 22, 64, 261])
@pytest.mark.parametrize("D", [16, 32, 64, 80])
def test_matches_sdpa(L, D, causal, dtype):
    g = torch.Generator().manual_seed(L * 100 + D)
    q, k, v = (torch.randn(2, 3, L, D, generator=g, dtype=dtype) for _ in range(3))
    for subtract_max in (False, True):
        out = attention_reference(q, k, v, causal=causal, subtract_max=subtract_max)
        assert out.dtype == dtype
        torch.testing.assert_close(out, sdpa(q, k, v, causal), **TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_decode_query_sees_all_cached_keys(causal):
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 4, 9, 32), torch.randn(2, 4, 9, 32)
    torch.testing.assert_close(attention_reference(q, k, v, causal=causal), sdpa(q, k, v, False), **TOL[torch.float32])


def test_non_contiguous_and_key_mask():
    base = torch.randn(2, 21, 3, 4, 16)  # [N, L, 3, H, D] like a qkv projection
    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    keep = torch.rand(2, 1, 1, 21) > 0.3
    keep[..., 0] = True
    out = attention_reference(q, k, v, key_mask=keep)
    ref = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=keep)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_low_precision_scores_in_input_dtype_and_output_dtype():
    q, k, v = (torch.randn(1, 2, 4, 32, dtype=torch.bfloat16) for _ in range(3))
    out_fp32_scores = attention_reference(q, k, v, causal=True, scores_fp32=True)
    out_bf16_scores = attention_reference(q, k, v, causal=True, scores_fp32=False)
    assert out_fp32_scores.dtype == out_bf16_scores.dtype == torch.bfloat16
    ref = sdpa(q.double(), k.double(), v.double(), True)
    torch.testing.assert_close(out_fp32_scores.double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_against_fp64(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 21, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: attention_reference(a, b, c, causal=causal), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    go = torch.randn(2, 2, 21, 16, generator=g)
    attention_reference(q32, k32, v32, causal=causal).backward(go)
    sdpa(q, k, v, causal).backward(go.double())
    for a, b in ((q32, q), (k32, k), (v32, v)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), h=st.integers(1, 4), lq=st.integers(1, 40), extra=st.integers(0, 8),
       d=st.sampled_from([16, 32, 64, 80]), causal=st.booleans())
def test_fuzz_shapes(n, h, lq, extra, d, causal):
    lk = lq + extra
    q, k, v = torch.randn(n, h, lq, d), torch.randn(n, h, lk, d), torch.randn(n, h, lk, d)
    torch.testing.assert_close(attention_reference(q, k, v, causal=causal), sdpa(q, k, v, causal), **TOL[torch.float32])


def test_bad_rank_names_shapes():
    with pytest.raises(ValueError, match=r"must be \[N, H, L, D\]"):
        attention_reference(torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8))
