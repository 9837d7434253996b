"""pixel_cross_entropy / pixel_log_probs vs the fp64 reference, forward and all gradients.

Tolerances (vs fp64): fp32 inputs 2e-5 abs + 1e-4 rel (fp32 GEMMs and log-sum-exp); bf16/fp16 inputs are
upcast on entry, so the op is compared with the fp64 reference of the *rounded* inputs at the same fp32
tolerance, and its gradients are returned in the input dtype (compared at that dtype's resolution).
"""
import pytest
import torch

import fractal_kernels.ops.pixel_cross_entropy as ce_mod
from fractal_kernels import pixel_cross_entropy, pixel_log_probs
from fractal_kernels.reference.cross_entropy import pixel_cross_entropy_reference

BACKENDS = ["triton"] + (["cuda"] if torch.cuda.is_available() else [])
DEV = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
            torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(ce_mod.launch, "CHUNK_ROWS", 64)  # exercise several chunks with small N


def make(n, c, v, dtype, seed=0, ignore=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g)).to(dtype).to(DEV).requires_grad_()
    w = (torch.randn(v, c, generator=g) * 0.2).to(dtype).to(DEV).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).to(DEV).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(DEV)
    if ignore and n > 2:
        t[::3] = -100
    return x, w, b, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [1, 7, 130, 300])
@pytest.mark.parametrize("c", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_gradients_vs_fp64(backend, reduction, n, c, dtype):
    x, w, b, t = make(n, c, 256, dtype, seed=n + c, ignore=(n == 130))
    out = pixel_cross_entropy(x, w, b, t, reduction=reduction, backend=backend)
    xd, wd, bd = (p.detach().double().requires_grad_() for p in (x, w, b))
    ref = pixel_cross_entropy_reference(xd, wd, bd, t, reduction)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    go = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, w, b), go.to(out.dtype))
    rgrads = torch.autograd.grad(ref, (xd, wd, bd), go)
    for name, a, r in zip("xwb", grads, rgrads):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a, r.to(dtype), **GRAD_TOL[dtype], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_probs_and_odd_vocabulary(backend):
    x, w, b, t = make(50, 24, 37, torch.float32)
    lp = pixel_log_probs(x, w, b, t, backend=backend)
    ref = torch.log_softmax(x.double() @ w.double().t() + b.double(), -1).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), ref, atol=2e-5, rtol=1e-5)
    lp.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bias_as_row_vector_and_only_some_grads():
    x, w, b, t = make(20, 16, 256, torch.float32)
    x.requires_grad_(False)
    out = pixel_cross_entropy(x, w, b.detach().reshape(1, -1), t, backend="triton")
    (gw,) = torch.autograd.grad(out, (w,))
    ref = pixel_cross_entropy_reference(x, w, b.detach(), t)
    (rw,) = torch.autograd.grad(ref, (w,))
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)


def test_empty_batch():
    x, w, b, t = make(0, 16, 256, torch.float32)
    assert pixel_cross_entropy(x, w, b, t, reduction="sum", backend="triton").item() == 0
    assert pixel_cross_entropy(x, w, b, t, reduction="none", backend="triton").shape == (0,)


@pytest.mark.parametrize("args, match", [
    (dict(x=torch.zeros(4)), r"x: expected a float tensor \[N, C\]"),
    (dict(weight=torch.zeros(256, 8)), r"weight: expected \[V, 16\]"),
    (dict(bias=torch.zeros(255)), "bias: expected 256 values"),
    (dict(target=torch.zeros(3, dtype=torch.long)), r"target: expected shape \(4,\)"),
    (dict(target=torch.zeros(4)), "target: expected int64"),
    (dict(target=torch.tensor([0, 1, 256, 3])), r"target: values must be in \[0, 256\)"),
    (dict(target=torch.tensor([0, -5, 2, 3])), r"target: values must be in \[0, 256\)"),
    (dict(reduction="avg"), "reduction: expected one of"),
])
def test_bad_inputs_name_the_argument(args, match):
    kw = dict(x=torch.zeros(4, 16), weight=torch.zeros(256, 16), bias=torch.zeros(256),
              target=torch.zeros(4, dtype=torch.long))
    kw.update(args)
    reduction = kw.pop("reduction", "mean")
    with pytest.raises((ValueError, TypeError), match=match):
        pixel_cross_entropy(kw["x"], kw["weight"], kw["bias"], kw["target"], reduction=reduction, backend="triton")
