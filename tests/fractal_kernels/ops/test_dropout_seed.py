"""``dropout_seed``'s domain: any Python int, taken mod 2**64, alike on every backend (the custom ops hold
an int64, so seeds >= 2**63 and negative ones used to crash the kernel path while the torch backend took them).
Tolerance: fp32 outputs and gradients as in test_tiny_attention (atol 2e-6, rtol 1e-5); masks are exact."""
import pytest
import torch

from fractal_kernels.ops.tiny_attention import tiny_attention, tiny_attention_packed
from fractal_kernels.reference.attention import attention_dropout_scale

SEEDS = [2**63, 2**64 - 1, -1, -(2**63), 2**64 + 7, 2**70 + 3, -(2**64) - 5]
TOL = dict(atol=2e-6, rtol=1e-5)


def _qkv(n=2, h=2, length=9, d=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, h, length, d, generator=g).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("seed", SEEDS)
def test_any_int_seed_runs_on_the_kernel_and_matches_torch(seed):
    q, k, v = _qkv()
    out = tiny_attention(q, k, v, dropout_p=0.3, dropout_seed=seed, backend="triton")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = tiny_attention(q, k, v, dropout_p=0.3, dropout_seed=seed, backend="torch")
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, **TOL)
    # the same stream as the seed's representative in [0, 2**64)
    keep = attention_dropout_scale(seed % 2**64, 2, 2, 9, 9, 0.3)
    assert torch.equal(keep, attention_dropout_scale(seed, 2, 2, 9, 9, 0.3))
    same = tiny_attention(q, k, v, dropout_p=0.3, dropout_seed=seed % 2**64, backend="triton")
    assert torch.equal(same, out)


def test_packed_entry_takes_large_and_negative_seeds():
    x = torch.randn(2, 9, 3 * 2 * 16, generator=torch.Generator().manual_seed(1))
    a = tiny_attention_packed(x, 2, dropout_p=0.5, dropout_seed=-1, backend="triton")
    b = tiny_attention_packed(x, 2, dropout_p=0.5, dropout_seed=2**64 - 1, backend="triton")
    c = tiny_attention_packed(x, 2, dropout_p=0.5, dropout_seed=2**64 - 1, backend="torch")
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, **TOL)
    assert not torch.equal(a, tiny_attention_packed(x, 2, dropout_p=0.5, dropout_seed=2**63 - 1, backend="triton"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [1.5, "7", torch.tensor(1.0)])
def test_non_integer_seed_is_a_clear_error_on_every_backend(backend, bad):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="dropout_seed: expected an int"):
        tiny_attention(q, k, v, dropout_p=0.3, dropout_seed=bad, backend=backend)
