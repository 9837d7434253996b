"""tiny_attention helpers at the edges random data does not reach (mutation survivors, issue #27 item 5).

``_cast`` to bf16 rounds to nearest even under the interpreter (whose own cast truncates); random values almost
never sit exactly halfway between two bf16 values, so the tie rule is checked here on values built to be ties.
"""
import pytest
import torch

from fractal_kernels.ops.tiny_attention.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fractal_kernels.ops.tiny_attention.kernels import _cast

    @triton.jit
    def _cast_bf16_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, _cast(tl.load(x_ptr + offs), tl.bfloat16))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cast_to_bf16_rounds_ties_to_even():
    ulp = 2.0 ** -7  # bf16's spacing in [1, 2)
    ties = [1 + k * ulp + ulp / 2 for k in range(8)]  # halfway: even k rounds down, odd k up
    near = [1 + ulp / 2 + 2.0 ** -20, 1 + ulp / 2 - 2.0 ** -20, 1 + 2.0 ** -20]
    vals = ties + [-t for t in ties] + [t * 2.0 ** 40 for t in ties] + near
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(vals, dtype=torch.float32), torch.randn(64 - len(vals), generator=g)])
    y = torch.empty(64, dtype=torch.bfloat16)
    _cast_bf16_kernel[(1,)](x, y, BLOCK=64)
    assert torch.equal(y, x.to(torch.bfloat16))  # PyTorch's cast rounds to nearest even
    # the oracle itself: the ties go to the even neighbour, down for even k and up for odd k
    even = torch.tensor([1 + (k + k % 2) * ulp for k in range(8)], dtype=torch.float64)
    assert torch.equal(x[:8].to(torch.bfloat16).double(), even)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lq,lens", [(1, [1, 5, 17]), (3, [3, 17, 9])])
def test_decode_rope_at_a_head_dim_that_is_no_power_of_two(lq, lens):
    # head dim 80 pads to a 128-wide tile: the RoPE loads' masks (rows and columns) keep the padding out
    from fractal_kernels.ops.tiny_attention import tiny_attention_decode
    from fractal_kernels.reference.attention import attention_decode_reference
    from fractal_models.ar import precompute_freqs_cis_2d
    n, h, lmax, d = 3, 2, 17, 80
    freqs = precompute_freqs_cis_2d(4, d)
    kc, vc, q = _rand(n, h, lmax, d, seed=1), _rand(n, h, lmax, d, seed=2), _rand(n, h, lq, d, seed=3)
    kv = torch.tensor(lens)
    out = tiny_attention_decode(q, kc, vc, kv, freqs_cis=freqs, backend="triton")
    ref = attention_decode_reference(q.double(), kc.double(), vc.double(), kv, freqs_cis=freqs)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["q", "k", "v", "o", "do"])
def test_backward_flags_a_non_finite_input_by_itself(which):
    # Through autograd a non-finite q, k or v already makes the forward's lse NaN; the backward kernel also
    # checks each of its inputs itself (its contract: any non-finite value of a pair, and only that pair, gives
    # NaN gradients). Here lse and o come from a clean forward and one input of pair (1, 0) gets a NaN.
    import fractal_kernels.ops.tiny_attention  # noqa: F401  (registers the custom ops)
    ops = torch.ops.fractal_kernels
    n, h, length, d = 4, 2, 8, 16
    q, k, v = (_rand(n, h, length, d, seed=s) for s in (1, 2, 3))
    scale = d ** -0.5
    o, lse = ops.tiny_attention_fwd(q, k, v, None, False, scale, "triton", 0.0, 0)
    do = _rand(n, h, length, d, seed=4)
    clean = ops.tiny_attention_bwd(do, q, k, v, o, lse, None, False, scale, "triton", 0.0, 0)
    args = dict(q=q.clone(), k=k.clone(), v=v.clone(), o=o.clone(), do=do.clone())
    args[which][1, 0, 3, 5] = float("nan")
    grads = ops.tiny_attention_bwd(args["do"], args["q"], args["k"], args["v"], args["o"], lse, None, False, scale,
                                   "triton", 0.0, 0)
    expected = torch.zeros(n, h, dtype=torch.bool)
    expected[1, 0] = True
    for name, g, c in zip("qkv", grads, clean):
        assert torch.equal(g.isnan().flatten(2).any(-1), expected), f"d{name}"
        torch.testing.assert_close(g[~expected], c[~expected], atol=0, rtol=0, msg=f"d{name}")


@pytest.mark.parametrize("length", [21, 70], ids=["packed", "streaming"])
def test_lengths_outside_0_L_act_clamped(length):
    # Without host checks (CUDA) seqlens reach the kernels unchecked; they treat values outside [0, L] as
    # clamped to it. The custom ops take seqlens as given, so the contract is checked here on the interpreter.
    import fractal_kernels.ops.tiny_attention  # noqa: F401  (registers the custom ops)
    ops = torch.ops.fractal_kernels
    n, h, d = 3, 2, 16
    q, k, v = (_rand(n, h, length, d, seed=s) for s in (5, 6, 7))
    do = _rand(n, h, length, d, seed=8)
    scale = d ** -0.5
    wild = torch.tensor([length + 3, 5, -2], dtype=torch.int32)
    clamped = wild.clamp(0, length)
    results = []
    for lens in (wild, clamped):
        o, lse = ops.tiny_attention_fwd(q, k, v, lens, False, scale, "triton", 0.0, 0)
        grads = ops.tiny_attention_bwd(do, q, k, v, o, lse, lens, False, scale, "triton", 0.0, 0)
        results.append((o, *grads))
    for name, a, b in zip(("o", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
