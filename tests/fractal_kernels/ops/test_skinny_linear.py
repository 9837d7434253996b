"""skinny_linear: the fused few-row linear (Triton, interpreter on CPU) against its reference, under the
interpreter's configuration and under the sm_90 / sm_80 configurations a GPU runs.

Numerics (``tests/fractal_kernels/numerics.py``): the kernel is compared with the reference run in float64 with
the kernel's rounding points (a 16-bit weight's input rounded to its dtype, the output to its dtype), so the
CPU's fp32 summation order cannot decide a result. Weights have unit gain (std ``K ** -0.5``) and inputs are
N(0, 1), so outputs are O(1): every element agrees to atol = rtol = 3e-5 (fp32 accumulation over K <= 2048
against exact), except, with 16-bit weights or outputs, elements of at most 30 % of the rows (at least one)
off by a rounding flip: <= 1 ulp of a 16-bit output's dtype, <= 2 ulps of the weight dtype for an fp32 output
after a 16-bit weight, at max(|value|, 1). fp32 weights and output: no element may differ.
"""
from __future__ import annotations

import pytest
import torch

from fractal_kernels.dispatch import BackendUnavailable, last_backend
from fractal_kernels.ops.skinny_linear import launch_triton, skinny_linear, skinny_linear_config
from fractal_kernels.ops.skinny_linear import kernels as sk_kernels
from fractal_kernels.ops.skinny_linear.launch import SkinnyLinearConfig, grid
from fractal_kernels.reference.skinny_linear import skinny_linear_reference

from tests.fractal_kernels import gpu_configs
from tests.fractal_kernels.numerics import FLIP_ULPS, allowed_rows, check_flips

CPU = torch.device("cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = dict(atol=3e-5, rtol=3e-5)
EPILOGUES = {
    "plain": {},
    "bias": {"bias"},
    "norm": {"norm"},
    "norm_gate": {"norm", "gate"},
    "residual": {"residual", "bias"},
    "all": {"norm", "bias", "gate", "residual"},
}


def inputs(m, n, k, wdtype, parts, seed=0, xdtype=F32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(xdtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(wdtype)
    kw = {}
    if "bias" in parts:
        kw["bias"] = torch.randn(n, generator=g) * 0.1
    if "norm" in parts:
        kw["norm_weight"] = 1.0 + 0.2 * torch.randn(k, generator=g)
        kw["norm_eps"] = 1e-5
    if "gate" in parts:
        kw["gate"] = (torch.randn(n, k, generator=g) * k ** -0.5).to(wdtype)
    if "residual" in parts:
        kw["residual"] = torch.randn(m, n, generator=g)
    return x, w, kw


def close(got, x, w, kw, what=""):
    want = skinny_linear_reference(x, w, compute_dtype=torch.float64, out_dtype=got.dtype, **kw)
    sixteen = w.dtype != F32 or got.dtype != F32
    if got.dtype != F32:
        flip_dtype, ulps = got.dtype, 1.0
    else:
        flip_dtype, ulps = w.dtype, FLIP_ULPS
    check_flips(got, want, **TOL, flip_dtype=flip_dtype if sixteen else F32,
                max_rows=allowed_rows(got.shape[0]) if sixteen else 0, max_ulps=ulps, what=what)


def run(x, w, kw, config=None):
    out_dtype = kw["residual"].dtype if "residual" in kw else w.dtype
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=out_dtype)
    launch_triton(x, w, kw.get("bias"), kw.get("norm_weight"), kw.get("norm_eps", 1e-5), kw.get("gate"),
                  kw.get("residual"), out, config=config)
    return out


def cache_slot(m, heads, d, dtype, pos=3, length=7):
    """Position ``pos`` of a NaN-filled KV cache ``[2, M, H, length, D]``: a strided ``[2, M, H, D]`` view."""
    return torch.full((2, m, heads, length, d), float("nan"), dtype=dtype)[:, :, :, pos]


def close_kv(q, kv, x, w, kw):
    """q ``[M, H D]`` and the cache slot ``[2, M, H, D]`` against the reference's ``[q | k | v]`` (k, v rounded to
    the output dtype, then to the cache's)."""
    m, nq = q.shape
    full = skinny_linear_reference(x, w, compute_dtype=torch.float64, out_dtype=q.dtype, **kw)
    close(q, x, w[:nq], kw, what="q")
    heads, d = kv.shape[2], kv.shape[3]
    want = full[:, nq:].to(kv.dtype).reshape(m, 2, heads, d).transpose(0, 1)
    got = torch.cat([kv[0].reshape(m, -1), kv[1].reshape(m, -1)], 1)
    close(got.to(q.dtype), x, w[nq:], kw, what="k | v")
    assert torch.isfinite(kv).all() and torch.equal(kv.isnan(), want.isnan())


# ------------------------------------------------------------------------------------- interpreter config
@pytest.mark.parametrize("wdtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 100, 72), (17, 24, 48)])
def test_matches_reference(m, n, k, wdtype, epilogue):
    x, w, kw = inputs(m, n, k, wdtype, EPILOGUES[epilogue])
    got = skinny_linear(x, w, backend="triton", **kw)
    assert last_backend("skinny_linear") == "triton"
    close(got, x, w, kw, what=f"M={m} N={n} K={k} {wdtype} {epilogue}")


@pytest.mark.parametrize("xdtype", [BF16, F16], ids=["x_bf16", "x_fp16"])
def test_16bit_input_rows(xdtype):
    """The attention output feeding ``wo`` is 16-bit: loaded and widened, same math."""
    x, w, kw = inputs(5, 40, 64, BF16, {"residual"}, xdtype=xdtype)
    close(skinny_linear(x, w, backend="triton", **kw), x, w, kw, what=str(xdtype))


# --------------------------------------------------------------------------------------------- GPU configs
# A GPU's configuration splits the columns so every SM has a program (BN = N // SMs rounded down to a power of
# two): with 132 SMs (sm_90) / 108 (sm_80), N >= 2 * SMs gives BN >= 2. K chosen for >= 2 trips of BK, masked
# (K % BK != 0) and EVEN; several column programs and, at M = 17, two row tiles.
GPU_CASES = [
    # (M, N, K, parts, wdtype)
    (2, 600, 1536, {"norm"}, BF16),               # qkv-like, BN = 4, BK = 1024: 2 trips, masked K
    (2, 300, 2048, {"residual"}, BF16),           # wo-like, BN = 2, BK = 1024: 2 trips, EVEN
    (2, 600, 1024, {"norm", "gate"}, BF16),       # SwiGLU, BN = 4, BK = 512: 2 trips, EVEN
    (17, 280, 300, {"residual", "bias"}, F16),    # two row tiles (BM = 16), BK = 256: 2 trips, masked
    (4, 270, 96, {"norm", "gate", "bias", "residual"}, F32),
]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_configuration(arch, case):
    m, n, k, parts, wdtype = GPU_CASES[case]
    cfg = skinny_linear_config(m, n, k, "gate" in parts, CPU, arch=arch, interpret=False)
    assert cfg.bn >= 2 and cfg.num_warps == 8 and cfg.num_stages == 3, cfg
    trips = -(-k // cfg.bk)
    assert trips >= 2 or case == 4, f"K={k} runs {trips} trip(s) of BK={cfg.bk}: the loop is not exercised"
    x, w, kw = inputs(m, n, k, wdtype, parts, seed=case)
    close(run(x, w, kw, config=cfg), x, w, kw, what=f"sm_{arch} {cfg}")


def test_every_aot_configuration_is_exercised():
    """Every (sm_90, sm_80) launch of the AOT capture list (benchmarks/aot/caselist.py: fractalar_in64's linears
    at 2 and 16 rows) runs here with its own constexprs -- rows, columns and K chunk, the fused parts, the
    rounding, EVEN_K -- at a width narrowed to 3 column programs plus a partial one and 2 K trips, against the
    reference; the recorded launches' code paths cover the capture's."""
    dtypes = {"float32": F32, "bfloat16": BF16, "float16": F16}
    paths = {p for p in gpu_configs.aot_code_paths()["_skinny_linear_kernel"].values()}
    exercised = set()
    for path in sorted(paths, key=str):
        f = dict(path[1:])
        wdtype = dtypes[path[0]]
        cfg = SkinnyLinearConfig(bm=f["BM"], bn=f["BN"], bk=f["BK"], num_warps=8, num_stages=3)
        m, n = max(1, f["BM"] - 1) if f["BM"] > 2 else f["BM"], 3 * f["BN"] + max(1, f["BN"] // 2)
        k = 2 * f["BK"] if f["EVEN_K"] else 2 * f["BK"] - 8
        parts = {name for name, flag in (("norm", "NORM"), ("gate", "GATE"), ("bias", "BIAS"),
                                         ("residual", "RES")) if f[flag]}
        if f["KV"]:  # [q | k | v] of 2 heads of D columns: 3 programs and a partial one
            d = (3 * f["BN"] // 2 + 1) // 2 * 2
            n = 6 * d
        x, w, kw = inputs(m, n, k, wdtype, parts, seed=len(exercised))
        with gpu_configs.recording(sk_kernels._skinny_linear_kernel) as seen:
            if f["KV"]:
                kv = cache_slot(m, 2, d, F32)
                q = torch.full((m, 2 * d), float("nan"), dtype=wdtype)
                launch_triton(x, w, None, kw.get("norm_weight"), kw.get("norm_eps", 1e-5), None, None, q,
                              config=cfg, kv_out=kv)
            else:
                got = run(x, w, kw, config=cfg)
        assert len(seen) == 1
        exercised.add(gpu_configs.launched_path("_skinny_linear_kernel", seen[0]))
        if f["KV"]:
            close_kv(q, kv, x, w, kw)
        else:
            close(got, x, w, kw, what=f"AOT path {path}")
    assert not gpu_configs.missing("_skinny_linear_kernel", exercised), gpu_configs.missing(
        "_skinny_linear_kernel", exercised)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("wdtype,kvdtype", [(F32, F32), (BF16, F32), (F16, F16)], ids=["fp32", "bf16-fp32", "fp16"])
@pytest.mark.parametrize("config", ["interpreter", "sm_90"])
def test_kv_out_writes_the_cache_slot(config, wdtype, kvdtype, backend):
    """An AR step's wqkv with its cache write fused: q comes back, k and v land in position 3 of a strided cache
    (NaN elsewhere stays NaN: nothing outside the slot is written)."""
    m, heads, d, k = 3, 4, 24, 96
    x, w, kw = inputs(m, 3 * heads * d, k, wdtype, {"norm"}, seed=11)
    cache = torch.full((2, m, heads, 7, d), float("nan"), dtype=kvdtype)
    kv = cache[:, :, :, 3]
    if config == "interpreter" or backend == "torch":
        q = skinny_linear(x, w, kv_out=kv, backend=backend, **kw)
    else:
        cfg = skinny_linear_config(m, 3 * heads * d, k, False, CPU, arch=90, interpret=False)
        q = torch.empty(m, heads * d, dtype=wdtype)
        launch_triton(x, w, None, kw["norm_weight"], kw["norm_eps"], None, None, q, config=cfg, kv_out=kv)
    assert q.shape == (m, heads * d) and q.dtype == wdtype
    close_kv(q, kv, x, w, kw)
    others = torch.cat([cache[:, :, :, :3], cache[:, :, :, 4:]], 3)
    assert others.isnan().all()
    # the same q and slot as the unfused path: the output, then a copy into the cache
    full = skinny_linear(x, w, backend=backend, **kw)
    assert torch.equal(q, full[:, :heads * d])
    assert torch.equal(kv, full[:, heads * d:].reshape(m, 2, heads, d).transpose(0, 1).to(kvdtype))
    with pytest.raises(ValueError, match="kv_out"):
        skinny_linear(x, w, kv_out=cache[:, :, :, 3, :d - 1], backend=backend, **kw)
    with pytest.raises(ValueError, match="kv_out"):
        skinny_linear(x, w, kv_out=kv, residual=torch.zeros(m, 3 * heads * d), backend=backend, **kw)


@pytest.mark.parametrize("arch,sms", [(90, 132), (80, 108)])
@pytest.mark.parametrize("n", [512, 1536, 2048, 4096, 11008])
def test_gpu_grid_has_a_program_per_sm(arch, sms, n):
    """The point of the op: the columns of every published width over at least one program per SM."""
    for m in (1, 2, 16):
        for gate in (False, True):
            cfg = skinny_linear_config(m, n, 1024, gate, CPU, arch=arch, interpret=False)
            programs = grid(cfg, m, n)[0]
            assert programs >= sms, f"N={n} M={m}: {programs} column programs < {sms} SMs ({cfg})"
            assert cfg.bm * cfg.bn * cfg.bk * (2 if gate else 1) <= 32 * 32 * cfg.num_warps, cfg


def test_small_n_keeps_one_column_per_program():
    cfg = skinny_linear_config(2, 100, 64, False, CPU, arch=90, interpret=False)
    assert cfg.bn == 1 and grid(cfg, 2, 100) == (100, 1)


# ----------------------------------------------------------------------------------------------- edge cases
def test_empty_batch_launches_nothing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("launched for M = 0")
    monkeypatch.setattr("fractal_kernels.ops.skinny_linear.api.launch_triton", boom)
    x, w, kw = inputs(0, 8, 16, BF16, {"residual"})
    out = skinny_linear(x, w, backend="triton", **kw)
    assert out.shape == (0, 8) and out.dtype == F32


def test_nonfinite_rows_stay_in_their_row():
    x, w, kw = inputs(6, 40, 64, BF16, {"norm", "bias", "residual"})
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    kw["residual"][4, 7] = float("-inf")
    got = skinny_linear(x, w, backend="triton", **kw)
    want = skinny_linear_reference(x, w, compute_dtype=torch.float64, **kw)
    assert torch.isnan(got[1]).all() and torch.isnan(got[2]).all()  # an inf in RMSNorm's mean: NaN row
    assert got[4, 7] == float("-inf")
    keep = [0, 3, 5]
    assert torch.isfinite(got[keep]).all() and torch.isfinite(got[4, :7]).all()
    assert torch.equal(torch.isnan(got), torch.isnan(want.float()))
    check_flips(got[keep], want[keep], **TOL, flip_dtype=BF16, max_rows=1, max_ulps=FLIP_ULPS)


def test_gate_silu_of_minus_inf_is_nan_like_the_reference():
    x = torch.tensor([[1.0, -1.0]])
    w = torch.tensor([[float("-inf"), 0.0], [1.0, 1.0]])
    gate = torch.ones(2, 2)
    got = skinny_linear(x, w, gate=gate, backend="triton")
    want = skinny_linear_reference(x, w, gate=gate, compute_dtype=torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(want.float())) and torch.isnan(got[0, 0])


@pytest.mark.parametrize("layout", ["row_stride", "k_stride", "huge_row_stride"])
def test_strided_inputs(layout):
    x, w, kw = inputs(3, 24, 40, BF16, {"norm", "residual"})
    if layout == "row_stride":  # rows of a wider buffer (a view of qkv / a [B, 1, E] slice)
        xs = torch.zeros(3, 100).narrow(1, 7, 40)
    elif layout == "k_stride":
        xs = torch.zeros(3, 80)[:, ::2]
    else:  # rows 2**22 elements apart: 64-bit row offsets
        xs = torch.empty_strided((3, 40), (1 << 22, 1), dtype=F32)
    xs.copy_(x)
    rs = torch.zeros(3, 50).narrow(1, 3, 24)
    rs.copy_(kw["residual"])
    kw["residual"] = rs
    close(skinny_linear(xs, w, backend="triton", **kw), x, w, kw, what=layout)


def test_torch_backend_is_the_reference_and_auto_on_cpu_is_torch():
    x, w, kw = inputs(3, 24, 40, BF16, {"norm", "gate", "bias"})
    want = skinny_linear_reference(x, w, **kw)
    assert torch.equal(skinny_linear(x, w, backend="torch", **kw), want)
    assert torch.equal(skinny_linear(x, w, **kw), want)
    assert last_backend("skinny_linear") == "torch"


def test_triton_refuses_grad_and_torch_backend_has_it():
    x, w, kw = inputs(2, 8, 16, F32, {"bias"})
    w.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        skinny_linear(x, w, backend="triton", **kw)
    with torch.no_grad():
        skinny_linear(x, w, backend="triton", **kw)
    x64, w64 = x.double().requires_grad_(True), w.detach().double().requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    out = skinny_linear(xg, w, backend="torch", **kw)
    out.square().sum().backward()
    ref = skinny_linear_reference(x64, w64, bias=kw["bias"].double(), compute_dtype=torch.float64)
    ref.square().sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.zeros(2, 3, 4)), "x: expected a float \\[M, K\\]"),
    (dict(x=torch.zeros(2, 4, dtype=torch.int32)), "x: expected a float"),
    (dict(x=torch.zeros(2, 4, dtype=torch.float64)), "x: expected fp32 / bf16 / fp16"),
    (dict(weight=torch.zeros(8, 5)), "weight: expected an \\[N, K=4\\]"),
    (dict(weight=torch.zeros(4, 8).t()), "weight: expected unit stride along K"),
    (dict(weight=torch.zeros(8, 4, dtype=torch.float64)), "weight: expected fp32 / bf16 / fp16"),
    (dict(x=torch.zeros(2, 0), weight=torch.zeros(8, 0)), "in_features >= 1"),
    (dict(bias=torch.zeros(7)), "bias: expected a contiguous float \\[N=8\\]"),
    (dict(norm_weight=torch.zeros(5)), "norm_weight: expected a contiguous float \\[K=4\\]"),
    (dict(norm_weight=torch.ones(4), norm_eps=-1.0), "norm_eps: expected a finite number >= 0"),
    (dict(gate=torch.zeros(8, 4, dtype=BF16)), "gate: expected a \\[N=8, K=4\\] torch.float32"),
    (dict(residual=torch.zeros(2, 7)), "residual: expected a float \\[M=2, N=8\\]"),
    (dict(out_dtype=torch.int64), "out_dtype: expected fp32 / bf16 / fp16"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(x=torch.zeros(2, 4), weight=torch.zeros(8, 4))
    args.update(bad)
    x, w = args.pop("x"), args.pop("weight")
    with pytest.raises((ValueError, TypeError), match=match):
        skinny_linear(x, w, backend="triton", **args)


def test_forced_triton_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("fractal_kernels.dispatch.triton_interpreting", lambda: False)
    with pytest.raises(BackendUnavailable, match="skinny_linear: backend 'triton'"):
        skinny_linear(torch.zeros(2, 4), torch.zeros(8, 4), backend="triton")


def test_kernel_is_triton_jit():
    assert sk_kernels.HAS_TRITON and hasattr(sk_kernels._skinny_linear_kernel, "run")
