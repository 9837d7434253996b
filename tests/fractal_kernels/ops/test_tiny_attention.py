"""tiny_attention (Triton; on CPU through the interpreter) vs the pure-PyTorch reference.

Tolerances, against an fp64 reference of the same (rounded) inputs:
* fp32: outputs 2e-5 abs / 1e-4 rel, gradients 5e-5 abs / 1e-4 rel (fp32 dots and exp; the interpreter and
  GPUs without TF32 both accumulate in fp32);
* bf16: 1.6e-2 abs+rel, fp16: 2e-3 abs+rel (the output is rounded to the input dtype once; gradients 3e-2 /
  4e-3: P and dS feed the dots after rounding on a GPU).
The CUDA kernels have their own GPU-only grid in test_tiny_attention_cuda.py.
"""
import math

import pytest
import torch

import fractal_kernels.ops.tiny_attention as ta
from fractal_kernels.dispatch import BackendUnavailable, last_backend, record
from fractal_kernels.ops.tiny_attention import tiny_attention, tiny_attention_decode, tiny_attention_packed
from fractal_kernels.reference.attention import (attention_decode_reference, attention_dropout_scale,
                                                 attention_reference, attention_varlen_reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
       torch.float16: dict(atol=2e-3, rtol=2e-3)}
GRAD_TOL = {torch.float32: dict(atol=5e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
            torch.float16: dict(atol=4e-3, rtol=4e-3)}


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def qkv(n, h, length, d, dtype=torch.float32, seed=0):
    return tuple(rand(n, h, length, d, dtype=dtype, seed=seed + i) for i in range(3))


def check_fwd_bwd(q, k, v, causal, grads=True, seqlens=None):
    dtype = q.dtype
    qs, ks, vs = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out = tiny_attention(qs, ks, vs, causal=causal, seqlens=seqlens, backend="triton")
    assert last_backend("tiny_attention") == "triton"
    assert out.dtype == dtype and out.shape == q.shape
    qd, kd, vd = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    if seqlens is None:
        ref = attention_reference(qd, kd, vd, causal=causal)
    else:
        ref = attention_varlen_reference(qd, kd, vd, seqlens, causal=causal)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    if grads:
        go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEV)
        got = torch.autograd.grad(out, (qs, ks, vs), go.to(dtype))
        exp = torch.autograd.grad(ref, (qd, kd, vd), go)
        for name, a, r in zip("qkv", got, exp):
            assert a.dtype == dtype and a.shape == q.shape, name
            torch.testing.assert_close(a.double(), r, **GRAD_TOL[dtype], msg=lambda m: f"d{name}: {m}")


LENGTHS = [1, 3, 4, 17, 21, 22, 64, 261]
DIMS = [16, 32, 64, 80]
HEADS = [1, 3, 8]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("length", LENGTHS)
def test_forward_grid_fp32(length, d, causal):
    # N = 5 is not a multiple of the pairs packed per program (2..64 for L <= 64); H cycles over 1, 3, 8
    h = HEADS[(LENGTHS.index(length) + DIMS.index(d)) % 3]
    n = 5 if length <= 64 else 1
    check_fwd_bwd(*qkv(n, h, length, d, seed=length * d), causal, grads=False)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 80])
@pytest.mark.parametrize("length", [1, 4, 17, 22, 64, 261])
def test_gradients_vs_fp64(length, d, causal):
    check_fwd_bwd(*qkv(1 if length > 64 else 3, 3, length, d, seed=length + d), causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,d", [(4, 32), (21, 64), (100, 64)])
def test_half_precision(dtype, length, d, causal):
    check_fwd_bwd(*qkv(2, 3, length, d, dtype=dtype, seed=3), causal)


@pytest.mark.parametrize("length", [21, 100])
def test_head_dim_128(length):
    check_fwd_bwd(*qkv(2, 2, length, 128, seed=5), causal=length == 100)


def test_n1_and_many_pairs_per_program():
    check_fwd_bwd(*qkv(1, 1, 4, 32), True)
    check_fwd_bwd(*qkv(37, 1, 4, 16), True)  # 37 pairs over programs of 16


@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_inputs(causal):
    n, h, length, d = 3, 4, 21, 32
    base = rand(n, length, h, 2 * d, seed=1)  # [N, L, H, 2D]: take every other head-dim block
    q = base[..., :d].transpose(1, 2)
    k = rand(n, length, h, d, seed=2).transpose(1, 2)  # [N, H, L, D] view of [N, L, H, D]
    v = rand(2 * n, h, length, d, seed=3)[::2]  # stride over N
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_fwd_bwd(q, k, v, causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [4, 22, 70])
def test_packed_entry_point(length, causal):
    n, h, d = 3, 4, 16
    qkv_t = rand(n, length, 3 * h * d, seed=length).requires_grad_()
    out = tiny_attention_packed(qkv_t, h, causal=causal, backend="triton")
    assert out.shape == (n, length, h * d) and out.is_contiguous()
    x = qkv_t.detach().double().requires_grad_()
    q, k, v = x.view(n, length, 3, h, d).permute(2, 0, 3, 1, 4)
    ref = attention_reference(q, k, v, causal=causal).transpose(1, 2).reshape(n, length, h * d)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(DEV)
    (g,) = torch.autograd.grad(out, qkv_t, go.float())
    (r,) = torch.autograd.grad(ref, x, go)
    torch.testing.assert_close(g.double(), r, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [4, 21, 70])
def test_variable_lengths(length, causal):
    n = 5
    lens = torch.tensor([0, 1, length, length // 2, 3], device=DEV)
    check_fwd_bwd(*qkv(n, 2, length, 32, seed=9), causal, seqlens=lens)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("lq,lens", [(1, [1, 5, 17]), (3, [3, 17, 9]), (2, [16, 16, 16])])
def test_decode_against_cache(lq, lens, rope):
    from fractal_models.ar import precompute_freqs_cis_2d
    n, h, lmax, d = 3, 2, 17, 32
    freqs = precompute_freqs_cis_2d(4, d).to(DEV) if rope else None  # 1 + 16 rows: condition row is zeros
    kc, vc = rand(n, h, lmax, d, seed=1), rand(n, h, lmax, d, seed=2)
    q = rand(n, h, lq, d, seed=3)
    kv = torch.tensor(lens, device=DEV)
    out = tiny_attention_decode(q, kc, vc, kv, freqs_cis=freqs, backend="triton")
    ref = attention_decode_reference(q.double(), kc.double(), vc.double(), kv, freqs_cis=freqs)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    if len(set(lens)) == 1:  # an int length means the same
        same = tiny_attention_decode(q, kc, vc, lens[0], freqs_cis=freqs, backend="triton")
        torch.testing.assert_close(same, out, atol=0, rtol=0)


def test_decode_rope_matches_the_ar_levels_math():
    """Rotating on load equals the AR level's apply_rotary_emb before caching, then plain causal attention."""
    from fractal_models.ar import apply_rotary_emb, precompute_freqs_cis_2d
    n, h, length, d = 2, 2, 10, 16
    freqs = precompute_freqs_cis_2d(3, d).to(DEV)
    x = [rand(n, length, h, d, seed=s) for s in range(3)]  # [B, L, H, D] like the AR block
    q_rot, k_rot = (apply_rotary_emb(t, freqs[:length]).transpose(1, 2) for t in x[:2])
    full = attention_reference(q_rot, k_rot, x[2].transpose(1, 2), causal=True)
    cache_k, cache_v = x[1].transpose(1, 2).contiguous(), x[2].transpose(1, 2).contiguous()
    for step in range(length):
        out = tiny_attention_decode(x[0][:, step:step + 1].transpose(1, 2), cache_k, cache_v, step + 1,
                                    freqs_cis=freqs, backend="triton")
        torch.testing.assert_close(out[:, :, 0], full[:, :, step], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [4, 21, 100])
def test_dropout_matches_the_reference_with_the_same_mask(length, causal):
    n, h, d, p, seed = 3, 2, 32, 0.3, 1234
    q, k, v = (t.requires_grad_() for t in qkv(n, h, length, d, seed=length))
    out = tiny_attention(q, k, v, causal=causal, dropout_p=p, dropout_seed=seed, backend="triton")
    keep = attention_dropout_scale(seed, n, h, length, length, p, DEV).double()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qd, kd, vd, causal=causal, dropout_scale=keep)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(DEV)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), go.float()), torch.autograd.grad(ref, (qd, kd, vd), go)):
        torch.testing.assert_close(a.double(), r, **GRAD_TOL[torch.float32])
    same = tiny_attention(q, k, v, causal=causal, dropout_p=p, dropout_seed=seed, backend="torch")
    torch.testing.assert_close(same, out, **TOL[torch.float32])  # the torch backend draws the same mask


def test_dropout_keeps_one_minus_p():
    keep = attention_dropout_scale(99, 64, 8, 21, 21, 0.3)  # 225 792 draws: std of the mean 1e-3
    assert abs(float((keep > 0).double().mean()) - 0.7) < 0.01
    assert set(keep.unique().tolist()) == {0.0, float(torch.tensor(1 / 0.7))}


def test_dropout_seeds_and_packed_entry():
    x = rand(2, 21, 3 * 2 * 16, seed=4)
    torch.manual_seed(0)
    a = tiny_attention_packed(x, 2, dropout_p=0.5, backend="triton")
    torch.manual_seed(0)
    b = tiny_attention_packed(x, 2, dropout_p=0.5, backend="triton")
    c = tiny_attention_packed(x, 2, dropout_p=0.5, backend="triton")
    assert torch.equal(a, b) and not torch.equal(a, c)  # seed from torch's RNG: reproducible, fresh per call
    d = tiny_attention_packed(x, 2, dropout_p=0.5, dropout_seed=7, backend="torch")
    torch.testing.assert_close(tiny_attention_packed(x, 2, dropout_p=0.5, dropout_seed=7, backend="triton"), d,
                               **TOL[torch.float32])
    with pytest.raises(ValueError, match=r"dropout_p: expected a number in \[0, 1\)"):
        tiny_attention_packed(x, 2, dropout_p=1.0)


def test_non_finite_inputs_stay_in_their_sequence():
    q, k, v = (t.requires_grad_() for t in qkv(6, 2, 4, 16, seed=4))
    with torch.no_grad():
        v[1, 0, 2, 3] = float("nan")
        k[3, 1, 0, 0] = float("inf")
    out = tiny_attention(q, k, v, backend="triton")
    bad = out.isnan().flatten(2).any(-1)
    expected = torch.zeros_like(bad)
    expected[1, 0] = expected[3, 1] = True
    assert torch.equal(bad, expected)  # 16 pairs share one tile: nothing leaks to the neighbours
    clean = torch.ones(6, 2, dtype=torch.bool)
    clean[1, 0] = clean[3, 1] = False
    ref = attention_reference(q.detach().double(), k.detach().double(), v.detach().double())
    torch.testing.assert_close(out.detach().double()[clean], ref[clean], **TOL[torch.float32])
    out.sum().backward()
    assert torch.equal(q.grad.isnan().flatten(2).any(-1), expected)


def test_empty_batch():
    q, k, v = (t.requires_grad_() for t in qkv(0, 4, 21, 32))
    out = tiny_attention(q, k, v, backend="triton")
    assert out.shape == (0, 4, 21, 32)
    out.sum().backward()
    assert q.grad.shape == q.shape
    assert tiny_attention_packed(rand(0, 5, 96), 2, backend="triton").shape == (0, 5, 32)


def test_torch_compile_keeps_the_custom_op():
    from torch._dynamo.testing import CompileCounterWithBackend
    q, k, v = qkv(2, 2, 4, 16)
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v):
        return tiny_attention(q, k, v, causal=True, backend="triton") * 2

    out = torch.compile(f, backend=counter, fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    graph_ops = [str(n.target) for g in counter.graphs for n in g.graph.nodes]
    assert any("fractal_kernels.tiny_attention_fwd" in t for t in graph_ops), graph_ops


def test_opcheck():
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 4, 16))
    torch.library.opcheck(torch.ops.fractal_kernels.tiny_attention_fwd.default, (q, k, v, None, True, 0.25, "triton", 0.0, 0))
    x = rand(2, 4, 3 * 2 * 16).requires_grad_()
    torch.library.opcheck(torch.ops.fractal_kernels.tiny_attention_packed_fwd.default, (x, 2, None, False, 0.25, "triton", 0.0, 0))


def test_dispatch_and_torch_backend():
    q, k, v = qkv(2, 2, 5, 16)
    ref = attention_reference(q, k, v, causal=True)
    out = tiny_attention(q, k, v, causal=True, backend="torch")
    assert last_backend("tiny_attention") == "torch"
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    if DEV == "cpu":
        tiny_attention(q, k, v)  # auto on CPU tensors: the PyTorch reference
        assert last_backend("tiny_attention") == "torch"
        with pytest.raises(BackendUnavailable, match="tiny_attention: backend 'cuda'"):
            tiny_attention(q, k, v, backend="cuda")
    long = qkv(1, 1, ta.MAX_L + 1, 16)
    torch.testing.assert_close(tiny_attention(*long), attention_reference(*long))  # auto: long goes to torch/SDPA
    with pytest.raises(ValueError, match="L=513 over the kernels' limit 512"):
        tiny_attention(*long, backend="triton")
    q64 = q.double()
    torch.testing.assert_close(tiny_attention(q64, k.double(), v.double()), attention_reference(q64, k.double(), v.double()))


@pytest.mark.parametrize("call,exc,match", [
    (lambda q, k, v: tiny_attention(q, k[:, :, :3], v), ValueError, "k, v: expected the shape of q"),
    (lambda q, k, v: tiny_attention(q[0], k, v), ValueError, r"q: expected a \[N, H, L, D\] tensor"),
    (lambda q, k, v: tiny_attention(q, k.half(), v), TypeError, "q, k, v: mixed dtypes"),
    (lambda q, k, v: tiny_attention(q.long(), k.long(), v.long()), TypeError, "q: expected float32"),
    (lambda q, k, v: tiny_attention(q, k.to("meta"), v), ValueError, "q, k, v: on different devices"),
    (lambda q, k, v: tiny_attention(q, k, v, scale=float("nan")), ValueError, "scale: expected a finite number"),
    (lambda q, k, v: tiny_attention(q, k, v, scale=math.inf), ValueError, "scale: expected a finite number"),
    (lambda q, k, v: tiny_attention(q, k, v, seqlens=torch.tensor([1, 9])), ValueError, r"seqlens: values must lie in \[0, 5\]"),
    (lambda q, k, v: tiny_attention(q, k, v, seqlens=torch.tensor([1.0, 2.0])), ValueError, "seqlens: expected an integer tensor"),
    (lambda q, k, v: tiny_attention(q, k, v, backend="fast"), ValueError, "backend: expected one of"),
    (lambda q, k, v: tiny_attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, backend="triton"),
     ValueError, r"q: the head dim must be contiguous"),
    (lambda q, k, v: tiny_attention_packed(q, 2), ValueError, r"qkv: expected a \[N, L, 3\*H\*D\] tensor"),
    (lambda q, k, v: tiny_attention_packed(torch.zeros(2, 5, 96), 5), ValueError, "num_heads: expected a positive int"),
    (lambda q, k, v: tiny_attention_decode(q, k, v, 9), ValueError, r"kv_lens: expected Lq=5 <= kv_lens <= Lmax=5"),
    (lambda q, k, v: tiny_attention_decode(q[:, :, :1], k, v, 3, freqs_cis=torch.zeros(2, 8, 2)), ValueError,
     r"freqs_cis: expected \[P >= 5, D/2=8, 2\]"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    q, k, v = qkv(2, 2, 5, 16)
    with pytest.raises(exc, match=match):
        call(q, k, v)


def test_unsupported_head_dim():
    q, k, v = qkv(1, 1, 4, 256)
    with pytest.raises(ValueError, match="q: head dim D=256 unsupported"):
        tiny_attention(q, k, v, backend="triton")


def test_auto_hands_lengths_past_the_measured_crossover_to_sdpa(monkeypatch, tmp_path):
    """auto uses SDPA from the length the benchmark measured as the crossover (file per device name)."""
    from fractal_kernels import dispatch, policy
    monkeypatch.setenv("FRACTAL_HOME", str(tmp_path))  # the overlay a GPU run writes
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    (tmp_path / "attention_crossover.json").write_text('{"%s": {"float32": {"16": 8}}}' % name)
    dispatch.reload()
    try:
        assert ta._measured_crossover(16, torch.float32) == 8 and ta._measured_crossover(32, torch.float32) is None
        monkeypatch.setattr(dispatch, "resolve", lambda op, backend, device, **kw: record(op, "triton"))  # auto on a GPU
        q, k, v = qkv(2, 2, 9, 16)
        out = tiny_attention(q, k, v)
        assert last_backend("tiny_attention") == "sdpa"
        torch.testing.assert_close(out, attention_reference(q, k, v), **TOL[torch.float32])
        tiny_attention(*qkv(2, 2, 7, 16))  # below the crossover: the kernel
        assert last_backend("tiny_attention") != "sdpa"
    finally:
        monkeypatch.delenv("FRACTAL_HOME")
        policy.clear()


# ---- int64 row offsets: views whose rows lie past 2^31 elements ------------------------------------------

def _huge_view_qkv(layout: str, length: int, d: int = 16):
    """q, k, v ``[N, H, L, D]`` fp16 views into one storage of 2^32 + a few elements whose row offsets
    ``h * sh`` or ``pos * sl`` reach 2^31..2^32 (int32 math wraps them by -2^32). The storage is only
    reserved: the few rows written are the only pages touched, so the test costs kilobytes, not 8 GiB. The
    views start 2^31 elements in, so a wrapped offset still lands inside the storage (on zeros): the bug
    shows as a wrong result, not a crash."""
    if layout == "sequence_major":  # [N=1, H=1, L, D], consecutive positions 2^31 / (L - 1) elements apart
        h, sh = 1, 0
        sl = -(-(2 ** 31) // (length - 1) // 16) * 16
    else:  # head-major: [N=1, H=3, L, D], head h at h * 2^30
        h, sh, sl = 3, 2 ** 30, 3 * d
    base = 2 ** 31
    size = base + (h - 1) * sh + (length - 1) * sl + 3 * d
    assert (h - 1) * sh + (length - 1) * sl >= 2 ** 31 and size <= 2 ** 32 + 2 ** 20
    big = torch.empty(size, dtype=torch.float16, device=DEV)
    views = [big.as_strided((1, h, length, d), (0, sh, sl, 1), base + i * d) for i in range(3)]
    for i, t in enumerate(views):
        t.copy_(rand(1, h, length, d, seed=40 + i))
    return views


@pytest.mark.skipif(DEV != "cpu", reason="the reserved 8 GiB storage is a CPU trick (lazy pages)")
@pytest.mark.parametrize("layout", ["sequence_major", "head_major"])
@pytest.mark.parametrize("length", [5, 70])  # packed kernels; streaming forward, dk/dv and dq kernels
def test_views_with_rows_past_2_31_elements(layout, length):
    q, k, v = _huge_view_qkv(layout, length)
    assert q.storage_offset() + q.stride(1) * (q.shape[1] - 1) + q.stride(2) * (length - 1) >= 2 ** 31
    qs, ks, vs = (t.requires_grad_() for t in (q, k, v))  # leaves viewing the big storage
    out = tiny_attention(qs, ks, vs, causal=True, backend="triton")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qd, kd, vd, causal=True)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float16])
    go = rand(*ref.shape, seed=50).double()
    got = torch.autograd.grad(out, (qs, ks, vs), go.half())
    exp = torch.autograd.grad(ref, (qd, kd, vd), go)
    for name, a, r in zip("qkv", got, exp):
        torch.testing.assert_close(a.double(), r, **GRAD_TOL[torch.float16], msg=lambda m: f"d{name}: {m}")


# ---- the GPU's rounding points under the interpreter -----------------------------------------------------

def _gpu_rounded_attention(q, k, v, scale, lens=None):
    """What the forward kernel computes on a GPU for 16-bit inputs: fp32 scores, P = exp(s - max) rounded to
    the input dtype before P.V (a 16-bit tensor-core dot, fp32 accumulation), fp32 denominator."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if lens is not None:
        keep = torch.arange(k.shape[2], device=q.device)[None, :] < lens[:, None]
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return ((p.to(q.dtype).float() @ v.float()) / p.sum(-1, keepdim=True)).to(q.dtype)


@pytest.mark.parametrize("length", [2, 70])  # packed and streaming forward
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_p_is_rounded_to_the_input_dtype_before_pv(dtype, length):
    """Two keys with scores 0 and -delta and values +64 / -64: the exact output 64 (1 - e^-delta) / (1 +
    e^-delta) is ~0.03 (bf16) / ~0.004 (fp16), but e^-delta rounds to 1 in the input dtype, so a GPU's P.V
    gives 0. The interpreter must give the GPU's answer, not the fp32 one."""
    n, d = 4, 16
    delta = 2.0 ** -10 if dtype == torch.bfloat16 else 2.0 ** -13
    q = torch.zeros(n, 1, length, d)
    q[..., 0] = 1.0
    k = torch.zeros(n, 1, length, d)
    k[:, :, 1, 0] = -delta
    v = torch.zeros(n, 1, length, d)
    v[:, :, 0], v[:, :, 1] = 64.0, -64.0
    q, k, v = (t.to(dtype).to(DEV) for t in (q, k, v))
    lens = torch.full((n,), 2, device=DEV) if length > 2 else None
    out = tiny_attention(q, k, v, scale=1.0, seqlens=lens, backend="triton")
    gpu = _gpu_rounded_attention(q, k, v, 1.0, lens)
    exact = attention_reference(q.double(), k.double(), v.double(), scale=1.0,
                                key_mask=None if lens is None else (torch.arange(length, device=DEV) < 2))
    rows = slice(0, 2)
    assert (gpu[:, :, rows].double() - exact[:, :, rows]).abs().max() > 3e-3  # the rounding point matters here
    torch.testing.assert_close(out[:, :, rows], gpu[:, :, rows], atol=1e-5, rtol=0)


def test_decode_rope_rounds_rotated_q_k_like_the_gpu():
    """bf16 decode with RoPE: the kernel rotates in fp32 and rounds to bf16 (the reference's ``type_as``)
    before the scores; with scores of a few tens that rounding moves the output by far more than the
    tolerance, so dropping it (or P's rounding) fails here."""
    from fractal_kernels.reference.attention import rope_reference
    from fractal_models.ar import precompute_freqs_cis_2d
    n, h, lmax, d = 3, 2, 17, 16
    freqs = precompute_freqs_cis_2d(4, d).to(DEV)
    kc = (rand(n, h, lmax, d, seed=61) * 3).to(torch.bfloat16)
    vc = rand(n, h, lmax, d, seed=62).to(torch.bfloat16)
    q = (rand(n, h, 1, d, seed=63) * 3).to(torch.bfloat16)
    lens = torch.tensor([17, 9, 5], device=DEV)
    out = tiny_attention_decode(q, kc, vc, lens, freqs_cis=freqs, backend="triton")
    kpos = torch.arange(lmax, device=DEV)
    keep = kpos[None, :] < lens[:, None]
    gpu, fp32_rope = [], []
    for rounded in (True, False):
        cast = (lambda t: t) if rounded else (lambda t: t.float())
        qr = rope_reference(cast(q), freqs, (lens - 1)[:, None])
        kr = rope_reference(cast(kc), freqs, kpos)
        s = (qr.float() @ kr.float().transpose(-1, -2)) * d ** -0.5
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        p = torch.exp(s - s.amax(-1, keepdim=True))
        o = (p.to(torch.bfloat16).float() @ vc.float()) / p.sum(-1, keepdim=True)
        (gpu if rounded else fp32_rope).append(o.to(torch.bfloat16))
    ulp = dict(atol=1e-3, rtol=2 ** -7)  # one bf16 rounding of the output apart at most
    assert not torch.allclose(gpu[0].float(), fp32_rope[0].float(), **ulp)  # the rounding point matters here
    torch.testing.assert_close(out.float(), gpu[0].float(), **ulp)


# ---- launch configuration per GPU arch (what the AOT gate compiles) ---------------------------------------

@pytest.mark.parametrize("arch", [80, 90])
def test_launch_configs_follow_the_target_arch(arch, monkeypatch):
    """The launchers take tiles, warps and stages from _attn_config for the arch device_arch reports (the
    AOT gate replays them under target_arch): the packed and decode paths never software-pipeline (decode
    at num_stages=3 needed 184-200 KB of shared memory, over sm_80's 163 KB), sm_80 and fp32 packed tiles
    are 32 rows."""
    from fractal_kernels._target import target_arch
    launches = []

    class Rec:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((self.name, a[0].dtype, kw))

    for name in ("_attn_fwd_kernel", "_attn_bwd_packed_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        monkeypatch.setattr(ta.launch, name, Rec(name))
    with target_arch(arch):
        for dtype in (torch.float32, torch.bfloat16):
            for length in (4, 21, 261):
                q = torch.zeros(2, 2, length, 64, dtype=dtype)
                lse = torch.zeros(2, 2, length)
                ta._triton_fwd(q, q, q, q, lse, None, False, 0.125)
                ta._triton_bwd(q, q, q, q, q, lse, None, False, 0.125, q, q, q)
            for lmax in (17, 257):
                q1, kc = torch.zeros(2, 2, 1, 64, dtype=dtype), torch.zeros(2, 2, lmax, 64, dtype=dtype)
                lens = torch.full((2,), lmax, dtype=torch.int32)
                ta._triton_fwd(q1, kc, kc, q1, torch.zeros(2, 2, 1), lens, True, 0.125, decode=True,
                               freqs=torch.zeros(lmax, 32, 2))
    assert len(launches) == 2 * (3 * 2 + 1 + 2)  # per dtype: 3 fwd, 2 packed bwd + 2 streaming bwd, 2 decode
    for name, dtype, kw in launches:
        assert "num_warps" in kw and "num_stages" in kw, name
        if kw.get("DECODE") or name == "_attn_bwd_packed_kernel" or kw.get("GROUPS", 1) > 1:
            assert kw["num_stages"] == 1, (name, kw)
        if name == "_attn_bwd_packed_kernel":
            assert kw["BLOCK"] == 32
        if name == "_attn_fwd_kernel" and not kw["DECODE"] and kw["GROUPS"] > 1:
            assert kw["BLOCK_M"] == (64 if arch == 90 and dtype != torch.float32 else 32), kw
