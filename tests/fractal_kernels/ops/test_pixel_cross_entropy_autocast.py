"""pixel_cross_entropy under torch.autocast: the logits stay fp32 on every backend (the op is documented fp32;
the Triton path used to raise a dtype error, the torch path to compute bf16 logits silently).

Tolerances: the result under autocast equals the op without autocast to fp32 accuracy (atol 2e-5, rtol 1e-5 vs
the fp64 reference of the same inputs) -- a bf16 GEMM would be off by ~1e-2 relative on these logits."""
import pytest
import torch

from fractal_kernels import pixel_cross_entropy, pixel_log_probs
from fractal_kernels.reference.cross_entropy import pixel_cross_entropy_reference

BACKENDS = ["torch", "triton"] + (["cuda"] if torch.cuda.is_available() else [])
DEV = "cuda" if torch.cuda.is_available() else "cpu"
AMP = [torch.bfloat16] + ([torch.float16] if DEV == "cuda" else [])


def make(n=40, c=64, v=256, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g).to(dtype).to(DEV).requires_grad_()
    w = (torch.randn(v, c, generator=g) * 0.3).to(dtype).to(DEV).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).to(DEV).requires_grad_()
    return x, w, b, torch.randint(0, v, (n,), generator=g).to(DEV)


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_logits_under_autocast(backend, reduction, amp):
    x, w, b, t = make()
    xd, wd, bd = (p.detach().double().requires_grad_() for p in (x, w, b))
    ref = pixel_cross_entropy_reference(xd, wd, bd, t, reduction)
    with torch.autocast(DEV, dtype=amp):
        out = pixel_cross_entropy(x, w, b, t, reduction=reduction, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEV)
    # backward outside autocast, as PyTorch recommends
    grads = torch.autograd.grad(out, (x, w, b), go.float())
    for a, r in zip(grads, torch.autograd.grad(ref, (xd, wd, bd), go)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_inputs_under_autocast(backend):
    # autocast hands the op bf16 activations: upcast on entry, fp32 logits, gradients back in bf16
    x, w, b, t = make(dtype=torch.bfloat16)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = pixel_cross_entropy(x, w, b, t, backend=backend)
        lp = pixel_log_probs(x, w, b, t, backend=backend)
    ref = pixel_cross_entropy_reference(x.detach().double(), w.detach().double(), b.detach().double(), t)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(-lp.double().mean(), ref, atol=2e-5, rtol=1e-5)
    assert torch.autograd.grad(out, x)[0].dtype == torch.bfloat16


def test_fused_backward_recompute_under_autocast():
    # reduction "none" recomputes the logits in backward: fp32 there too, even if backward runs under autocast
    x, w, b, t = make()
    xd, wd, bd = (p.detach().double().requires_grad_() for p in (x, w, b))
    ref = pixel_cross_entropy_reference(xd, wd, bd, t, "none")
    go = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = pixel_cross_entropy(x, w, b, t, reduction="none", backend="triton")
        grads = torch.autograd.grad(out, (x, w, b), go.float())
    for a, r in zip(grads, torch.autograd.grad(ref, (xd, wd, bd), go)):
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-4)
