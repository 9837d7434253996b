"""Self-tests of the BLAS-independent numerics check (``tests/fractal_kernels/numerics.py``, issue #27).

The check must (a) pass a computation that differs from the fp64 reference only by its fp32 summation order --
here the op's own fp32 reference with every linear's sum permuted and split in two, what another BLAS (MKL's
AVX-512 vs AVX2 kernels) or a GPU's tensor cores do -- so a BLAS-order dependence cannot come back on any
machine, and (b) fail a systematic error: the same reference with a truncating 16-bit cast (a bug the old
mean-error bound was there to catch), an element off by more than the ulp bound, flips in too many rows, NaN on
one side only.
"""
import pytest
import torch

from fractal_kernels.ops.ar_stack import pack_ar_stack
from fractal_kernels.ops.mar_stack import pack_mar_stack
from fractal_kernels.reference import ar_stack as ref_ar
from fractal_kernels.reference import mar_stack as ref_mar
from tests.fractal_kernels.numerics import allowed_rows, check_flips, flips, ulp
from tests.fractal_kernels.ops import test_ar_stack as ar_tests
from tests.fractal_kernels.ops import test_mar_stack as mar_tests


def test_ulp():
    one = torch.tensor([1.0, 1.5, 3.0, -3.0, 0.0])
    assert ulp(one, torch.bfloat16).tolist()[:4] == [2 ** -7, 2 ** -7, 2 ** -6, 2 ** -6]
    assert ulp(one, torch.float16).tolist()[:3] == [2 ** -10, 2 ** -10, 2 ** -9]
    assert ulp(one, torch.float32)[0] == 2 ** -23
    assert ulp(one, torch.bfloat16)[4] > 0  # zero: the smallest normal's spacing, never 0
    # one rounding: a value and its bf16 neighbour are 1 ulp apart
    x = torch.tensor([1.2345])
    up = torch.nextafter(x.bfloat16(), torch.tensor([2.0]).bfloat16())
    assert float((up.double() - x.bfloat16().double()) / ulp(x, torch.bfloat16)) == 1.0


def test_allowed_rows():
    assert [allowed_rows(n) for n in (1, 2, 3, 17, 100)] == [1, 1, 1, 5, 30]


def test_check_flips_fails_what_it_must():
    want = torch.randn(10, 8, dtype=torch.float64)
    got = want.float().clone()
    check_flips(got, want, atol=1e-6, rtol=1e-6, flip_dtype=torch.bfloat16, max_rows=0)  # fp32 rounding only
    one = got.clone()
    one[3, 2] += 1.5 * 2 ** -7 * max(1.0, abs(float(want[3, 2])))  # 1.5 ulps of bf16
    with pytest.raises(AssertionError, match="ulps"):
        check_flips(one, want, atol=1e-6, rtol=1e-6, flip_dtype=torch.bfloat16, max_rows=3, max_ulps=1.0)
    check_flips(one, want, atol=1e-6, rtol=1e-6, flip_dtype=torch.bfloat16, max_rows=3, max_ulps=2.0)
    with pytest.raises(AssertionError, match="rows"):
        check_flips(one, want, atol=1e-6, rtol=1e-6, flip_dtype=torch.bfloat16, max_rows=0, max_ulps=2.0)
    many = got + 2 ** -9  # every row off (a systematic shift under one ulp)
    with pytest.raises(AssertionError, match="rows"):
        check_flips(many, want, atol=1e-6, rtol=1e-6, flip_dtype=torch.bfloat16, max_rows=allowed_rows(10))
    nan = got.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="finite"):
        check_flips(nan, want, atol=1e-6, rtol=1e-6, flip_dtype=torch.bfloat16, max_rows=10)
    both = want.clone()
    both[0, 0] = float("nan")
    assert flips(nan, both, atol=1e-6, rtol=1e-6, flip_dtype=torch.bfloat16)["nonfinite"] == 0


def _other_order(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` in fp32 with the K sum permuted and split in two halves (another BLAS's order)."""
    k = a.shape[-1]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    a, w = a[..., perm], w.to(a.dtype)[:, perm]
    h = k // 2
    return a[..., :h] @ w[:, :h].t() + a[..., h:] @ w[:, h:].t()


def _truncate(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` cast to ``dtype`` rounding toward zero (the bug), back in t's dtype."""
    r = t.to(dtype)
    toward0 = torch.nextafter(r, torch.zeros_like(r))
    return torch.where(r.to(t.dtype).abs() > t.abs(), toward0, r).to(t.dtype)


def _patch_ar(monkeypatch, how):
    real = ref_ar._linear

    def linear(a, w):
        if a.dtype != torch.float32:  # the fp64 reference stays itself
            return real(a, w)
        if w.dtype in (torch.bfloat16, torch.float16):
            a = _truncate(a, w.dtype) if how == "truncate" else a.to(w.dtype).float()
        return _other_order(a, w) if how == "other_order" else a @ w.float().t()
    monkeypatch.setattr(ref_ar, "_linear", linear)


def _patch_mar(monkeypatch, how):
    real = ref_mar._linear

    def linear(a, w, b):
        if a.dtype != torch.float32:
            return real(a, w, b)
        a = _truncate(a, w.dtype) if how == "truncate" else a.to(w.dtype).float()
        return (_other_order(a, w) if how == "other_order" else a @ w.float().t()) + b.float()
    monkeypatch.setattr(ref_mar, "_linear", linear)


AR_CASES = [(d, h, dt, 17, depth) for d, h in ((32, 2), (48, 3), (64, 4)) for dt in (torch.bfloat16, torch.float16)
            for depth in (1, 2)]


@pytest.mark.parametrize("dim,heads,wdtype,bsz,depth", AR_CASES)
def test_ar_check_passes_another_summation_order(dim, heads, wdtype, bsz, depth, monkeypatch):
    _patch_ar(monkeypatch, "other_order")
    blocks, norm, freqs = ar_tests.level(dim, heads, depth)
    w = pack_ar_stack(blocks, norm, wdtype)
    g = torch.Generator().manual_seed(bsz + depth)
    xs = [torch.randn(bsz, dim, generator=g) for _ in range(len(freqs))]
    ar_tests.check_steps(xs, w, freqs, heads, backend="torch")
    ar_tests.check_steps([x.bfloat16() for x in xs], pack_ar_stack(blocks, norm, torch.bfloat16), freqs, heads,
                         torch.bfloat16, backend="torch")


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_ar_check_fails_a_truncating_cast(wdtype, monkeypatch):
    _patch_ar(monkeypatch, "truncate")
    blocks, norm, freqs = ar_tests.level(48, 3, 2)
    w = pack_ar_stack(blocks, norm, wdtype)
    xs = [torch.randn(17, 48, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    with pytest.raises(AssertionError):
        ar_tests.check_steps(xs, w, freqs, 3, backend="torch")


MAR_CASES = [(d, h, dt, depth, n, seq) for d, h in mar_tests.SHAPES for dt in (torch.bfloat16, torch.float16)
             for depth, n, seq in ((1, 3, 22), (2, 4, 22), (2, 1, 5))]


@pytest.mark.parametrize("D,H,wdtype,depth,N,L", MAR_CASES)
def test_mar_check_passes_another_summation_order(D, H, wdtype, depth, N, L, monkeypatch):
    _patch_mar(monkeypatch, "other_order")
    blocks, norm = mar_tests.make_stack(D, H, depth, seed=D + depth)
    w = pack_mar_stack(blocks, norm, wdtype)
    x = torch.randn(N, L, D, generator=torch.Generator().manual_seed(1))
    mar_tests.close_to_reference(ref_mar.mar_block_stack_reference(x, w, H), x, w, H)
    xb = x.bfloat16()
    mar_tests.close_to_reference(ref_mar.mar_block_stack_reference(xb, w, H), xb, w, H)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("depth,N,L", [(1, 3, 22), (1, 1, 5)])  # one block: where the roundings are checked
def test_mar_check_fails_a_truncating_cast(wdtype, depth, N, L, monkeypatch):
    _patch_mar(monkeypatch, "truncate")
    blocks, norm = mar_tests.make_stack(40, 2, depth, seed=40 + depth)
    w = pack_mar_stack(blocks, norm, wdtype)
    x = torch.randn(N, L, 40, generator=torch.Generator().manual_seed(1))
    with pytest.raises(AssertionError):
        mar_tests.close_to_reference(ref_mar.mar_block_stack_reference(x, w, 2), x, w, 2)


def test_the_kernel_rounding_points_matter():
    """The fp64 reference rounds where the kernel does: without the 16-bit rounding of the linear inputs it is
    far from the 16-bit result (so the check is not comparing against something the rounding cannot move)."""
    blocks, norm = mar_tests.make_stack(32, 2, 1, seed=33)
    w16 = pack_mar_stack(blocks, norm, torch.bfloat16)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    y = ref_mar.mar_block_stack_reference(x, w16, 2)
    w32 = w16._replace(**{k: getattr(w16, k).float() for k in ("qkv_w", "proj_w", "fc1_w", "fc2_w")})
    far = ref_mar.mar_block_stack_reference(x, w32, 2, compute_dtype=torch.float64)
    with pytest.raises(AssertionError):
        mar_tests.close_to_reference(y, x, w32, 2)
    assert (y.double() - far).abs().max() > 1e-3
