"""The hand-written CUDA tiny-attention kernels (``fractal_kernels._C.tiny_attention_fwd/bwd``), called
directly, against an fp64 PyTorch reference written here: softmax(q k^T * scale) v with the causal and
per-sequence-length masks, log-sum-exp per query row, and fp64 autograd for dq, dk, dv.

Tolerances (compared with the fp64 reference of the *rounded* inputs; ``atol`` is relative to the largest
magnitude of the reference tensor, ``rtol`` element-wise):
  fp32: 1e-5 forward, 5e-5 gradients (fp32 FMAs, no TF32);
  fp16: 2e-3 forward, 5e-3 gradients (P and dS are rounded to fp16 before their tensor-core products);
  bf16: 1.6e-2 forward, 3e-2 gradients (same, at bf16's 8-bit mantissa);
  lse : 2e-5 absolute + relative for every dtype (fp32 scores of exactly representable products).
Outputs are pre-filled with NaN so a row the kernels forget to write fails the test.
Needs a CUDA device and the built extension; skips with the reason otherwise.
"""
import itertools
import math

import pytest
import torch

try:
    import fractal_kernels._C as _C
except ImportError:  # extension not built (e.g. CPU-only machine)
    _C = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_C is None or not hasattr(_C, "tiny_attention_fwd"),
                       reason="fractal_kernels._C with tiny_attention_fwd is not built "
                              "(FRACTAL_KERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation)"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FWD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_TOL = {torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LSE_TOL = 2e-5

LS = [1, 3, 4, 17, 21, 22, 64, 261, 512]
DS = [16, 32, 64, 80, 128]
NS = [1, 5, 33]
HS = [1, 3, 8]


def _shape_cases():
    """Every (L, D) pair once, cycling through N and H; long sequences get small N*H to keep the fp64
    reference (N*H*L*L doubles) small."""
    cases = []
    for i, (L, D) in enumerate(itertools.product(LS, DS)):
        N, H = NS[i % len(NS)], HS[(i // len(NS)) % len(HS)]
        if L >= 261:
            N, H = min(N, 5), min(H, 3)
        cases.append((N, H, L, D))
    return cases


SHAPES = _shape_cases()


def reference(q, k, v, seqlens, causal, scale):
    """fp64 (o, lse) with the kernels' conventions: rows of queries >= len are zero (lse 0)."""
    N, H, L, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("nhid,nhjd->nhij", q, k) * scale
    pos = torch.arange(L, device=q.device)
    visible = torch.ones(N, 1, L, L, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & (pos[None, None, None, :] <= pos[None, None, :, None])
    if seqlens is not None:
        lens = seqlens.long()
        visible = visible & (pos[None, :] < lens[:, None])[:, None, None, :]
        q_live = (pos[None, :] < lens[:, None])[:, None, :]  # [N, 1, L]
    else:
        q_live = torch.ones(N, 1, L, dtype=torch.bool, device=q.device)
    # rows with no visible key (only sequences of length 0) get a harmless all-visible row, zeroed below
    visible = visible | ~visible.any(-1, keepdim=True)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.softmax(s, -1) @ v
    o = torch.where(q_live[..., None], o, torch.zeros_like(o))
    lse = torch.where(q_live, lse, torch.zeros_like(lse))
    return o, lse


def _tol_close(actual, expected, tol, what):
    expected = expected.double()
    atol = tol * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _nan_like(shape, dtype, device="cuda"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def run_fwd(q, k, v, seqlens, causal, scale, o=None):
    N, H, L, D = q.shape
    if o is None:
        o = _nan_like(q.shape, q.dtype)
    else:
        o.fill_(float("nan"))
    lse = _nan_like((N, H, L), torch.float32)
    _C.tiny_attention_fwd(q, k, v, o, lse, seqlens, causal, scale)
    return o, lse


def run_bwd(dout, q, k, v, o, lse, seqlens, causal, scale):
    dq, dk, dv = (_nan_like(q.shape, q.dtype) for _ in range(3))
    _C.tiny_attention_bwd(dout, q, k, v, o, lse, dq, dk, dv, seqlens, causal, scale)
    return dq, dk, dv


def check(q, k, v, seqlens, causal, dtype, out=None, backward=True, seed=0):
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D)
    o, lse = run_fwd(q, k, v, seqlens, causal, scale, out)
    torch.cuda.synchronize()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_o, ref_lse = reference(qd, kd, vd, seqlens, causal, scale)
    _tol_close(o, ref_o, FWD_TOL[dtype], "o")
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=LSE_TOL * max(1.0, ref_lse.abs().max().item()),
                               rtol=LSE_TOL, msg=lambda m: f"lse: {m}")
    if not backward:
        return
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g, device="cuda").to(dtype)
    dq, dk, dv = run_bwd(dout, q, k, v, o, lse, seqlens, causal, scale)
    torch.cuda.synchronize()
    rq, rk, rv = torch.autograd.grad(ref_o, (qd, kd, vd), dout.double())
    for name, a, r in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert a.dtype == dtype, name
        _tol_close(a, r, GRAD_TOL[dtype], name)


def make_qkv(N, H, L, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(N, H, L, D, generator=g, device="cuda").to(dtype) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N%d-H%d-L%d-D%d" % s)
def test_forward_backward_vs_fp64(shape, dtype, causal):
    N, H, L, D = shape
    q, k, v = make_qkv(N, H, L, D, dtype, seed=L * 1000 + D)
    check(q, k, v, None, causal, dtype, seed=L + D)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("N,H,L,D", [(33, 8, 21, 64), (5, 3, 22, 80), (7, 4, 4, 32), (3, 2, 261, 64),
                                     (2, 1, 512, 16)])
def test_seqlens(N, H, L, D, dtype, causal):
    q, k, v = make_qkv(N, H, L, D, dtype, seed=N + L)
    g = torch.Generator(device="cuda").manual_seed(7)
    lens = torch.randint(0, L + 1, (N,), generator=g, device="cuda")
    lens[0] = 0  # an empty sequence: all zeros
    lens[-1] = L
    if N > 2:
        lens[1] = 1
    check(q, k, v, lens.to(torch.int32), causal, dtype, seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("N,H,L,D,causal", [(33, 8, 21, 64, False), (9, 4, 4, 32, True), (3, 3, 261, 80, False),
                                            (4, 2, 17, 128, True)])
def test_packed_qkv_views_and_strided_output(N, H, L, D, causal, dtype):
    """q, k, v as views of a packed qkv projection [N, L, 3*H*D]; o a view into a [N, L, H*D] buffer."""
    g = torch.Generator(device="cuda").manual_seed(11)
    qkv = torch.randn(N, L, 3 * H * D, generator=g, device="cuda").to(dtype)
    q, k, v = qkv.view(N, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each [N, H, L, D], stride(-1) == 1
    assert not q.is_contiguous() and q.stride(-1) == 1
    out_buf = torch.empty(N, L, H * D, dtype=dtype, device="cuda")
    out = out_buf.view(N, L, H, D).transpose(1, 2)
    lens = torch.randint(1, L + 1, (N,), generator=g, device="cuda").to(torch.int32)
    check(q, k, v, lens, causal, dtype, out=out)
    # the output landed in the [N, L, H*D] buffer
    assert torch.equal(out_buf.view(N, L, H, D).transpose(1, 2), out)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_unaligned_views_use_the_scalar_path(dtype):
    """Base pointers off by one element (not 16-byte aligned) for inputs, output and gradients."""
    N, H, L, D = 3, 2, 22, 64
    g = torch.Generator(device="cuda").manual_seed(5)
    numel = N * H * L * D

    def off_by_one():
        buf = torch.randn(numel + 1, generator=g, device="cuda").to(dtype)
        return buf[1:].view(N, H, L, D)

    q, k, v = off_by_one(), off_by_one(), off_by_one()
    assert q.data_ptr() % 16 != 0
    out = off_by_one()
    scale = 1.0 / math.sqrt(D)
    o, lse = run_fwd(q, k, v, None, True, scale, out)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_o, ref_lse = reference(qd, kd, vd, None, True, scale)
    _tol_close(o, ref_o, FWD_TOL[dtype], "o")
    dout = off_by_one()
    dq, dk, dv = (off_by_one() for _ in range(3))
    for t in (dq, dk, dv):
        t.fill_(float("nan"))
    _C.tiny_attention_bwd(dout, q, k, v, o, lse, dq, dk, dv, None, True, scale)
    rq, rk, rv = torch.autograd.grad(ref_o, (qd, kd, vd), dout.double())
    for name, a, r in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        _tol_close(a, r, GRAD_TOL[dtype], name)


def test_many_pairs_grid():
    """N*H above the 65535 limit of gridDim.y/z: the 1-D task grid must cover every pair."""
    N, H, L, D = 40000, 4, 4, 16  # 160k pairs, the pixel-head shape
    q, k, v = make_qkv(N, H, L, D, torch.bfloat16, seed=9)
    check(q, k, v, None, True, torch.bfloat16, backward=True)


def test_unsupported_head_dim_raises():
    q = torch.randn(2, 2, 8, 48, device="cuda")
    o = torch.empty_like(q)
    lse = torch.empty(2, 2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="head dim"):
        _C.tiny_attention_fwd(q, q, q, o, lse, None, False, 0.1)
