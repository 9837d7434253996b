"""fused_linear: the many-row linear with a LayerNorm prologue and a bias / GELU / residual epilogue (Triton,
interpreter on CPU) against its reference, under the interpreter's configuration and under the sm_90 / sm_80
configurations a GPU runs (the tensor-core dot as its interpreter emulation: bf16 tl.dot is wrong there).

Numerics (``tests/fractal_kernels/numerics.py``): against the reference in float64 with the kernel's rounding
points (a 16-bit weight's input rounded to its dtype, the output to its dtype). Weights of unit gain, inputs
N(0, 1): every element agrees to atol = rtol = 3e-5 (fp32 accumulation over K <= 512 against exact), except,
with 16-bit weights or outputs, elements of at most 30 % of the rows (at least one) off by a rounding flip:
<= 1 ulp of a 16-bit output's dtype, <= 2 ulps of the weight dtype for an fp32 output after a 16-bit weight, at
max(|value|, 1). fp32 weights and output: no element may differ.
"""
from __future__ import annotations

import pytest
import torch

from fractal_kernels.dispatch import last_backend
from fractal_kernels.ops.fused_linear import fused_linear, fused_linear_config, grid, launch_triton
from fractal_kernels.ops.fused_linear import kernels as fl_kernels
from fractal_kernels.ops.fused_linear.launch import FusedLinearConfig
from fractal_kernels.reference.fused_linear import fused_linear_reference

from tests.fractal_kernels import gpu_configs
from tests.fractal_kernels.numerics import FLIP_ULPS, allowed_rows, check_flips

CPU = torch.device("cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = dict(atol=3e-5, rtol=3e-5)
EPILOGUES = {
    "plain": set(),
    "bias_gelu": {"bias", "gelu"},
    "norm": {"norm", "bias"},
    "norm_gelu": {"norm", "bias", "gelu"},
    "residual": {"residual", "bias"},
}


def inputs(m, n, k, wdtype, parts, seed=0, xdtype=F32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) + (0.5 if "norm" in parts else 0.0)).to(xdtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(wdtype)
    kw = {}
    if "bias" in parts:
        kw["bias"] = torch.randn(n, generator=g) * 0.1
    if "norm" in parts:
        kw["norm_weight"] = 1.0 + 0.2 * torch.randn(k, generator=g)
        kw["norm_bias"] = 0.1 * torch.randn(k, generator=g)
        kw["norm_eps"] = 1e-6
    if "gelu" in parts:
        kw["act"] = "gelu"
    if "residual" in parts:
        kw["residual"] = torch.randn(m, n, generator=g)
    return x, w, kw


def close(got, x, w, kw, what=""):
    want = fused_linear_reference(x, w, compute_dtype=torch.float64, out_dtype=got.dtype, **kw)
    sixteen = w.dtype != F32 or got.dtype != F32
    flip_dtype, ulps = (got.dtype, 1.0) if got.dtype != F32 else (w.dtype, FLIP_ULPS)
    check_flips(got, want, **TOL, flip_dtype=flip_dtype if sixteen else F32,
                max_rows=allowed_rows(got.shape[0]) if sixteen else 0, max_ulps=ulps, what=what)


def run(x, w, kw, config=None):
    out_dtype = kw["residual"].dtype if "residual" in kw else w.dtype
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=out_dtype)
    launch_triton(x, w, kw.get("bias"), kw.get("norm_weight"), kw.get("norm_bias"), kw.get("norm_eps", 1e-5),
                  kw.get("act", "none"), kw.get("residual"), out, config=config)
    return out


@pytest.mark.parametrize("wdtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (70, 136, 72), (5, 40, 300)])
def test_matches_reference(m, n, k, wdtype, epilogue):
    x, w, kw = inputs(m, n, k, wdtype, EPILOGUES[epilogue])
    got = fused_linear(x, w, backend="triton", **kw)
    assert last_backend("fused_linear") == "triton"
    close(got, x, w, kw, what=f"M={m} N={n} K={k} {wdtype} {epilogue}")


@pytest.mark.parametrize("xdtype", [BF16, F16], ids=["x_bf16", "x_fp16"])
def test_16bit_input_rows(xdtype):
    x, w, kw = inputs(33, 40, 64, xdtype, {"residual", "bias"}, xdtype=xdtype)
    close(fused_linear(x, w, backend="triton", **kw), x, w, kw, what=str(xdtype))


# GPU configurations: the largest tile whose grid gives every SM a program; cases chosen so each tile shape, the
# 32- and 64-deep K chunks, masked and EVEN K, several row and column tiles and a GROUP_M band boundary run.
GPU_CASES = [
    # (M, N, K, parts, wdtype, expected (BM, BN, BK))
    (130, 200, 96, {"norm", "bias", "gelu"}, BF16, (64, 64, 64)),          # small grid: the smallest tile
    (1100, 2200, 48, {"residual", "bias"}, BF16, (128, 128, 32)),           # big grid: 128 x 128, 32-deep
    (600, 2000, 128, {"norm", "bias", "residual"}, F16, (64, 128, 64)),    # 10 x 16 = 160 programs; fp32 out (2000 16-bit outputs a row would flip somewhere in most rows)
    (70, 100, 80, {"norm", "bias", "residual"}, F32, (32, 32, 32)),
]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_gpu_configuration(arch, case):
    m, n, k, parts, wdtype, tile = GPU_CASES[case]
    cfg = fused_linear_config(m, n, k, wdtype, CPU, arch=arch, interpret=False)
    if arch == 90 or case != 2:  # sm_80 has 108 SMs: a different tile can win at the boundary
        assert (cfg.bm, cfg.bn, cfg.bk) == tile, cfg
    assert -(-k // cfg.bk) >= 2, cfg
    x, w, kw = inputs(m, n, k, wdtype, parts, seed=case)
    with gpu_configs.recording(fl_kernels._fused_linear_kernel) as seen:
        got = run(x, w, kw, config=cfg)
    assert seen[0]["kwargs"]["num_stages"] == cfg.num_stages and seen[0]["kwargs"]["num_warps"] == cfg.num_warps
    close(got, x, w, kw, what=f"sm_{arch} {cfg}")


def test_every_aot_configuration_is_exercised():
    """Every (sm_90, sm_80) launch of the AOT capture list (the MAR levels' linears at batch 1 and 256) runs here
    with its own constexprs at a narrowed size (3 row tiles, 2 column tiles plus a partial one, 2 K trips)."""
    dtypes = {"float32": F32, "bfloat16": BF16, "float16": F16}
    paths = set(gpu_configs.aot_code_paths()["_fused_linear_kernel"].values())
    exercised = set()
    for path in sorted(paths, key=str):
        f = dict(path[1:])
        wdtype = dtypes[path[0]]
        cfg = FusedLinearConfig(bm=f["BM"], bn=f["BN"], bk=f["BK"], group_m=f["GROUP_M"],
                                dot16=0 if wdtype == F32 else 1, num_warps=4, num_stages=3)
        m, n = 3 * f["BM"] - 5, 2 * f["BN"] + f["BN"] // 2
        k = 2 * f["BK"] if f["EVEN_K"] else 2 * f["BK"] - 8
        parts = {name for name, on in (("norm", f["NORM"]), ("bias", f["BIAS"]), ("gelu", f["ACT"] == 1),
                                       ("residual", f["RES"])) if on}
        x, w, kw = inputs(m, n, k, wdtype, parts, seed=len(exercised))
        with gpu_configs.recording(fl_kernels._fused_linear_kernel) as seen:
            got = run(x, w, kw, config=cfg)
        exercised.add(gpu_configs.launched_path("_fused_linear_kernel", seen[0]))
        close(got, x, w, kw, what=f"AOT path {path}")
    assert not gpu_configs.missing("_fused_linear_kernel", exercised), gpu_configs.missing(
        "_fused_linear_kernel", exercised)


@pytest.mark.parametrize("arch,sms", [(90, 132), (80, 108)])
def test_gpu_grid_fills_the_chip_where_it_can(arch, sms):
    """The MAR levels' shapes: batch 1 (M = 2 x 257 tokens) and batch 256 (M = 512 x 257)."""
    for m in (514, 131584):
        for n, k in ((3072, 1024), (4096, 1024), (1024, 4096), (1024, 1024)):
            cfg = fused_linear_config(m, n, k, BF16, CPU, arch=arch, interpret=False)
            assert grid(cfg, m, n)[0] >= sms, (m, n, k, cfg)
            assert (cfg.bm, cfg.bn) == ((128, 128) if m > 514 else (cfg.bm, cfg.bn)), cfg


# ----------------------------------------------------------------------------------------------- edge cases
def test_empty_batch_launches_nothing(monkeypatch):
    monkeypatch.setattr("fractal_kernels.ops.fused_linear.api.launch_triton",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("launched for M = 0")))
    x, w, kw = inputs(0, 8, 16, BF16, {"residual"})
    out = fused_linear(x, w, backend="triton", **kw)
    assert out.shape == (0, 8) and out.dtype == F32


def test_nonfinite_rows_stay_in_their_row():
    x, w, kw = inputs(70, 40, 64, BF16, {"norm", "bias", "residual"})
    x[1, 3] = float("nan")
    x[66, 5] = float("inf")
    kw["residual"][4, 7] = float("-inf")
    got = fused_linear(x, w, backend="triton", **kw)
    want = fused_linear_reference(x, w, compute_dtype=torch.float64, **kw)
    assert torch.isnan(got[1]).all() and torch.isnan(got[66]).all() and got[4, 7] == float("-inf")
    assert torch.equal(torch.isnan(got), torch.isnan(want.float()))
    keep = [i for i in range(70) if i not in (1, 4, 66)]
    close(got[keep], x[keep], w, {k: (v[keep] if k == "residual" else v) for k, v in kw.items()})


@pytest.mark.parametrize("layout", ["row_stride", "k_stride", "huge_row_stride"])
def test_strided_inputs(layout):
    x, w, kw = inputs(3, 24, 40, BF16, {"norm", "bias", "residual"})
    if layout == "row_stride":
        xs = torch.zeros(3, 100).narrow(1, 7, 40)
    elif layout == "k_stride":
        xs = torch.zeros(3, 80)[:, ::2]
    else:
        xs = torch.empty_strided((3, 40), (1 << 22, 1), dtype=F32)
    xs.copy_(x)
    close(fused_linear(xs, w, backend="triton", **kw), x, w, kw, what=layout)


def test_torch_backend_is_the_reference_with_gradients():
    x, w, kw = inputs(6, 24, 40, F32, {"norm", "bias", "gelu"})
    assert torch.equal(fused_linear(x, w, **kw), fused_linear_reference(x, w, **kw))
    assert last_backend("fused_linear") == "torch"
    xg = x.clone().requires_grad_(True)
    fused_linear(xg, w, backend="torch", **kw).square().sum().backward()
    x64 = x.double().requires_grad_(True)
    fused_linear_reference(x64, w.double(), **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()},
                           compute_dtype=torch.float64).square().sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="no backward"):
        fused_linear(xg, w, backend="triton", **kw)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.zeros(2, 3, 4)), "x: expected a float \\[M, K\\]"),
    (dict(x=torch.zeros(2, 4, dtype=torch.float64)), "x: expected fp32 / bf16 / fp16"),
    (dict(weight=torch.zeros(8, 5)), "weight: expected an \\[N, K=4\\]"),
    (dict(weight=torch.zeros(4, 8).t()), "weight: expected unit stride along K"),
    (dict(x=torch.zeros(2, 0), weight=torch.zeros(8, 0)), "in_features >= 1"),
    (dict(bias=torch.zeros(7)), "bias: expected a contiguous float \\[N=8\\]"),
    (dict(norm_weight=torch.ones(4)), "give both"),
    (dict(norm_weight=torch.ones(5), norm_bias=torch.zeros(5)), "norm_weight: expected a contiguous float \\[K=4\\]"),
    (dict(norm_weight=torch.ones(4), norm_bias=torch.zeros(4), norm_eps=float("nan")), "norm_eps"),
    (dict(act="relu"), "act: expected one of"),
    (dict(residual=torch.zeros(2, 7)), "residual: expected a float \\[M=2, N=8\\]"),
    (dict(out_dtype=torch.int64), "out_dtype: expected fp32 / bf16 / fp16"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(x=torch.zeros(2, 4), weight=torch.zeros(8, 4))
    args.update(bad)
    x, w = args.pop("x"), args.pop("weight")
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear(x, w, backend="triton", **args)
