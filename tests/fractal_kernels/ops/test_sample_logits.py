"""fractal_kernels.sample_logits: Triton (interpreter on CPU) and torch backends against the reference math.

Tolerances: probabilities fp32 atol 1e-6 (exp/sum rounding differs between libms); ids exact (the
uniforms here never sit within 1e-6 of a CDF boundary, checked); statistical tests below.
"""
import math

import pytest
import torch

from fractal_kernels.dispatch import BackendUnavailable, last_backend
from fractal_kernels.ops.sample_logits import sample_logits
from fractal_kernels.reference.philox import philox4x32, philox_uniform
from fractal_kernels.reference.pixel_sampling import sample_logits_reference

BACKENDS = ["torch", "triton"] + (["cuda"] if torch.cuda.is_available() else [])
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def logits(n, v, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype).to(DEV)


def reference(cond, uncond, uniforms, cfg=1.0, temperature=1.0, filter_threshold=0.0, top_p=1.0, top_k=0):
    greedy = temperature == 0
    return sample_logits_reference(cond, uncond if not (not isinstance(cfg, torch.Tensor) and cfg == 1.0) else None,
                                   cfg=cfg, inv_temperature=1.0 if greedy else 1.0 / temperature,
                                   filter_threshold=filter_threshold, top_p=top_p, top_k=top_k, uniforms=uniforms,
                                   greedy=greedy)


CASES = [
    dict(),
    dict(cfg=3.0, filter_threshold=1e-4, temperature=1 / 0.9),
    dict(cfg=1.5, filter_threshold=1e-2, temperature=1 / 1.3),
    dict(cfg=0.5, temperature=2.0),
    dict(cfg="rows", top_p=0.8),
    dict(top_k=5),
    dict(top_k=7, top_p=0.5, cfg=2.0),
    dict(top_k=1000),
    dict(top_p=1e-6),
    dict(temperature=0.0, cfg=2.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("n, v", [(1, 256), (7, 256), (300, 256), (5, 17), (33, 2), (9, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_with_explicit_uniforms(backend, case, n, v, dtype):
    kw = dict(CASES[case])
    if kw.get("cfg") == "rows":
        kw["cfg"] = torch.linspace(1.0, 4.0, n, device=DEV)
    cond, uncond = logits(n, v, 1, dtype), logits(n, v, 2, dtype)
    u = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEV)
    guided = "cfg" in kw
    probs = torch.empty(n, v, device=DEV)
    ids = sample_logits(cond, uncond if guided else None, uniforms=u, out_probs=probs, backend=backend, **kw)
    assert last_backend("sample_logits") == backend
    ref_ids, ref_probs = reference(cond, uncond if guided else None, u, **kw)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=0)
    cdf = ref_probs.double().cumsum(-1)
    near = ((cdf - u[:, None]).abs() < 1e-6).any(-1)
    assert torch.equal(ids[~near], ref_ids[~near])
    assert ids.dtype == torch.int64 and ((ids >= 0) & (ids < v)).all()
    assert (probs.gather(1, ids[:, None]) > 0).all()  # never a zero-probability index


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_draws_identical_across_backends_and_launches(backend):
    cond = logits(1000, 256, 4)
    a = sample_logits(cond, seed=123, backend=backend)
    b = sample_logits(cond, seed=123, backend="torch")
    assert torch.equal(a, b)
    # a row's draw depends only on (seed, offset + row): prefixes and offset windows agree
    assert torch.equal(sample_logits(cond[:100], seed=123, backend=backend), a[:100])
    assert torch.equal(sample_logits(cond[600:], seed=123, offset=600, backend=backend), a[600:])
    assert not torch.equal(sample_logits(cond, seed=124, backend=backend), a)


def test_strided_rows_like_the_pixel_head():
    x = logits(50, 3 * 256, 5).reshape(50, 3, 256)
    for i in range(3):
        view = x[:, i]
        assert view.stride(0) == 768
        assert torch.equal(sample_logits(view, seed=1, backend="triton"), sample_logits(view.contiguous(), seed=1, backend="torch"))


def test_philox_known_answers():
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(v) for v in philox4x32(z, z, z, z, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    w = [torch.tensor([x]) for x in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    assert [int(v) for v in philox4x32(*w, 0xA4093822, 0x299F31D0)] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    u = philox_uniform(7, 2 ** 32 - 3, 6)  # counter carries into the high word
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_and_degenerate_rows(backend):
    v = 16
    x = torch.zeros(6, v, device=DEV)
    x[0, :8] = float("nan")  # NaN entries are never drawn
    x[1, 3] = float("inf")  # +inf takes all the mass
    x[2, [4, 9]] = float("inf")  # shared between two +inf entries
    x[3] = float("nan")  # no finite logit: -1
    x[4] = float("-inf")
    x[5, 2] = 5.0
    probs = torch.empty(6, v, device=DEV)
    ids = sample_logits(x, seed=0, out_probs=probs, backend=backend)
    assert ids[0] >= 8 and ids[1] == 3 and ids[2] in (4, 9) and ids[3] == -1 and ids[4] == -1
    torch.testing.assert_close(probs[2, [4, 9]], torch.tensor([0.5, 0.5], device=DEV))
    assert probs[3].abs().sum() == 0
    # every conditional probability below the threshold: all unconditional logits are lifted, still valid
    cond, uncond = logits(4, 256, 8, scale=0.01), logits(4, 256, 9)
    p2 = torch.empty(4, 256, device=DEV)
    sample_logits(cond, uncond, cfg=2.0, filter_threshold=1.0, seed=0, out_probs=p2, backend=backend)
    _, ref = reference(cond, uncond, torch.zeros(4, dtype=torch.float64), cfg=2.0, filter_threshold=1.0)
    torch.testing.assert_close(p2, ref, atol=1e-6, rtol=0)


def chi2_critical(df, z=4.753):
    """Wilson-Hilferty upper quantile; z = 4.753 is a one-sided 1e-6 tail (false failure rate per case)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


STAT_CASES = [
    dict(),
    dict(cfg=3.0, filter_threshold=1e-4, temperature=1 / 0.9),
    dict(cfg=1.5, filter_threshold=1e-2, temperature=1 / 1.3, top_p=0.9),
    dict(cfg=2.0, top_k=20),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(STAT_CASES)))
def test_chi_square_against_reference_probabilities(backend, case):
    """10^5 seeded draws of one distribution; chi-square over bins with expected count >= 5.

    The seeds are fixed, so the test is deterministic; with fresh seeds it would fail with probability
    ~1e-6 per case if the sampler were exact."""
    n = 100_000
    kw = STAT_CASES[case]
    cond = logits(1, 256, 10 + case, scale=1.5).expand(n, 256)
    uncond = logits(1, 256, 20 + case, scale=1.5).expand(n, 256)
    guided = "cfg" in kw
    ids = sample_logits(cond, uncond if guided else None, seed=1000 + case, backend=backend, **kw)
    _, p = reference(cond[:1], uncond[:1] if guided else None, torch.zeros(1, dtype=torch.float64), **kw)
    expected = p[0].double().cpu() * n
    counts = torch.bincount(ids.cpu(), minlength=256).double()
    assert counts[expected == 0].sum() == 0  # nothing outside the support
    big = expected >= 5
    stat = (((counts[big] - expected[big]) ** 2) / expected[big]).sum().item()
    rest_e, rest_c = expected[~big].sum().item(), counts[~big].sum().item()
    df = int(big.sum()) - 1
    if rest_e > 0:
        stat += (rest_c - rest_e) ** 2 / rest_e
        df += 1
    assert stat < chi2_critical(max(df, 1)), (stat, df)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cond_logits=torch.zeros(4)), r"cond_logits: expected a \[N, V\] tensor"),
    (dict(cond_logits=torch.zeros(4, 8, dtype=torch.long)), "cond_logits: expected a floating-point"),
    (dict(cond_logits=torch.zeros(2, 5000)), "vocabulary width V=5000"),
    (dict(cond_logits=torch.zeros(8, 4).t()), "last dimension must be contiguous"),
    (dict(uncond_logits=torch.zeros(3, 8)), r"uncond_logits: expected shape \(4, 8\)"),
    (dict(uncond_logits=torch.zeros(4, 8, dtype=torch.float64)), "uncond_logits: dtype"),
    (dict(cfg=torch.ones(3)), "cfg: expected a scalar or 4 per-row values"),
    (dict(cfg=float("nan")), "cfg: expected a finite number"),
    (dict(temperature=-1.0), r"temperature: expected a finite number >= 0 \(0 = greedy\)"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(filter_threshold=2.0), "filter_threshold"),
    (dict(uniforms=torch.zeros(3)), r"uniforms: expected a float tensor of shape \(4,\)"),
    (dict(out_probs=torch.zeros(4, 8, dtype=torch.float64)), "out_probs"),
    (dict(backend="fast"), "backend: expected one of"),
])
def test_bad_inputs_name_the_argument(kwargs, match):
    kwargs = dict(kwargs)
    cond = kwargs.pop("cond_logits", torch.zeros(4, 8))
    with pytest.raises((ValueError, TypeError), match=match):
        sample_logits(cond, **kwargs)


def test_empty_batch_and_unavailable_backend():
    assert sample_logits(torch.zeros(0, 256), seed=0, backend="triton").shape == (0,)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="backend 'cuda' needs CUDA tensors"):
            sample_logits(torch.zeros(2, 8), backend="cuda")


def test_seed_none_uses_the_global_rng():
    cond = logits(64, 256, 11)
    torch.manual_seed(5)
    a = sample_logits(cond, backend="torch")
    torch.manual_seed(5)
    assert torch.equal(a, sample_logits(cond, backend="torch"))
    g = torch.Generator().manual_seed(9)
    b = sample_logits(cond, generator=g, backend="torch")
    assert torch.equal(b, sample_logits(cond, generator=torch.Generator().manual_seed(9), backend="triton"))
