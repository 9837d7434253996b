"""The sampler contract (``fractal_kernels.reference.pixel_sampling``, module docstring) on every backend present.

``sample_logits``: torch, triton (GPU, or the interpreter on CPU tensors), cuda (the compiled extension on a GPU);
``pixel_head_sample``'s draw: torch, cpu (the compiled C++ kernel), triton. A backend that is absent here is a
skipped parameter that says why.

Adversarial inputs: uniforms 0, 2^-24, 1 - 2^-24 and exactly on (and just below) CDF steps; one survivor; all
filtered; +-inf and NaN logits; top_k = 1; top_p -> 0; per-row cfg; greedy. Assertions:

* never a zero-probability id (against the backend's own final probabilities and against the exact ones);
* every id is the contract's draw from the backend's own final probabilities (``contract_draw`` below, written
  independently of the reference implementation), exactly -- the draw is bit-exact by contract;
* where the contract makes the probabilities exact (tied surviving logits, so ``p = 1 / n``), every backend's
  probabilities are those exactly and every backend returns the same, spelled-out ids (``u`` on the step
  ``j / n`` draws survivor ``j``, just below it survivor ``j - 1``).

No tolerances except in the random-weight pixel-head case, where the reference's probabilities are recomputed
from the kernel's own logits (fp32, another exp / summation order): there ids must equal the contract's draw
wherever no CDF step lies within 1e-6 of the target (checked, and the count of exempt rows is bounded).
"""
import math

import pytest
import torch

from fractal_kernels import cpu, pixel_head_sample, sample_logits
from fractal_kernels.dispatch import backend_report, last_backend
from fractal_kernels.ops.pixel_head import _launch_cpu, _launch_triton
from fractal_kernels.reference.pixel_head import pack_pixel_head_weights
from fractal_kernels.reference.pixel_sampling import inverse_cdf_draw, sample_logits_reference
from fractal_models.pixelloss import PixelLoss

V = 256
U_MAX = 1.0 - 2.0 ** -24  # the largest Philox uniform
U_MIN = 2.0 ** -24  # the smallest positive one
NAN, INF = float("nan"), float("inf")


def _need(backend: str) -> None:
    ok, why = backend_report()[backend]
    if not ok:
        pytest.skip(f"backend {backend!r} absent here: {why}")


def contract_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The contract's draw, spelled out independently: q = floor(p * 2^52) (p >= 0), C = cumsum q (exact int64),
    T = C[-1], t = u * T in fp64 (u <= 0 / NaN -> 0, u >= 1 -> t = T - 1), id = the first i with C_i > t; -1 when T = 0."""
    p = probs.float().double()  # fp32 values, exactly
    q = torch.floor(p * 2.0 ** 52).to(torch.int64)
    cdf = q.cumsum(-1)
    total = cdf[:, -1]
    u = u.double().nan_to_num(0.0).clamp(min=0.0)
    t = torch.where(u < 1, u * total.double(), total.double() - 1)  # u >= 1: the largest double below 1
    ids = torch.searchsorted(cdf.double().contiguous(), t[:, None].contiguous(), right=True).reshape(-1)
    return torch.where(total > 0, ids, torch.full_like(ids, -1))


def _zero_free(probs: torch.Tensor, ids: torch.Tensor) -> bool:
    ok = ids >= 0
    return bool((probs[ok].gather(1, ids[ok, None]) > 0).all())


# ---------------------------------------------------------------- the reference draw itself

def test_reference_draw_edges():
    p = torch.tensor([[0.0, 0.25, 0.0, 0.25, 0.5, 0.0]] * 9)
    u = torch.tensor([0.0, U_MIN, 0.25, 0.25 - 2 ** -53, 0.5, 0.75, U_MAX, NAN, 1.0], dtype=torch.float64)
    # u = 0 -> the first entry with mass; on a step -> the next entry with mass; u >= 1 -> the last one; NaN -> 0
    assert inverse_cdf_draw(p, u).tolist() == [1, 1, 3, 1, 4, 4, 4, 1, 4]
    assert torch.equal(inverse_cdf_draw(p, u), contract_draw(p, u))
    assert inverse_cdf_draw(torch.zeros(2, 4), torch.tensor([0.0, 0.5])).tolist() == [-1, -1]  # no mass
    assert inverse_cdf_draw(torch.tensor([[2.0, 6.0]]), torch.tensor([0.3])).tolist() == [1]  # weights: normalised


# ---------------------------------------------------------------- sample_logits

def _tie_rows(n_rows: int, seed: int):
    """Rows whose surviving logits tie (so p = 1 / n exactly on every backend), the rest -inf, NaN or (in
    +inf rows) finite; survivors include columns 0 and V - 1. Returns logits [N, V], survivor lists."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, V, generator=g) * 4
    surv = []
    for r in range(n_rows):
        n = [1, 2, 4, 8, 16, 256][r % 6]
        cols = torch.randperm(V, generator=g)[:n].sort().values
        if n < V and r % 3 == 0:
            cols[0] = 0
        if n < V and r % 4 == 1:
            cols[-1] = V - 1
        cols = cols.unique()
        kind = (r // 6) % 3
        row = torch.full((V,), -INF if kind == 0 else NAN)
        if kind == 2:  # +inf survivors among finite logits: they tie at FLT_MAX and take all the mass
            row = x[r].clone()
            row[cols] = INF
        else:
            row[cols] = float(r % 5) - 2.0
        x[r] = row
        surv.append(cols.tolist())
    return x, surv


def _tie_uniforms(surv, reps: int):
    """Per row a cycle of adversarial uniforms and the survivor each must draw: 0, 2^-24, 1 - 2^-24, every step
    j / n exactly (-> survivor j) and just below it (-> survivor j - 1)."""
    us, want = [], []
    for r, cols in enumerate(surv):
        n = len(cols)
        cases = [(0.0, 0), (U_MIN, 0), (U_MAX, n - 1)]
        for j in range(1, n):
            cases += [(j / n, j), (j / n - 2.0 ** -24, j - 1)]
        k = (r * 7 + reps) % len(cases)
        us.append(cases[k][0])
        want.append(cols[cases[k][1]])
    return torch.tensor(us, dtype=torch.float64), torch.tensor(want)


def _run(backend, cond, uncond=None, **kw):
    dev = "cuda" if backend == "cuda" else cond.device
    n, v = cond.shape
    probs = torch.full((n, v), NAN, device=dev)
    args = {k: (t.to(dev) if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
    ids = sample_logits(cond.to(dev), None if uncond is None else uncond.to(dev), out_probs=probs,
                        backend=backend, **args)
    assert last_backend("sample_logits") == backend
    return ids.cpu(), probs.cpu()


SAMPLE_BACKENDS = ["torch", "triton", "cuda"]


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_logits_ties_steps_and_edges(backend):
    _need(backend)
    x, surv = _tie_rows(96, seed=0)
    for rep in range(2):
        u, want = _tie_uniforms(surv, rep)
        for dtype in (torch.float32, torch.bfloat16):  # small integers and +-inf / NaN are exact in bf16
            ids, probs = _run(backend, x.to(dtype), uniforms=u)
            exact = torch.zeros(len(surv), V)
            for r, cols in enumerate(surv):
                exact[r, cols] = 1.0 / len(cols)
            assert torch.equal(probs, exact), "tied survivors: p = 1 / n exactly"
            assert torch.equal(ids, want)
            assert torch.equal(ids, contract_draw(probs, u))


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_logits_all_filtered_rows(backend):
    _need(backend)
    x = torch.randn(6, V)
    x[0] = -INF
    x[1] = NAN
    x[2, ::2], x[2, 1::2] = NAN, -INF
    x[3, 5] = NAN  # rows 3..5 stay valid: a NaN is only never drawn
    x[4, :] = -INF
    x[4, 17] = 3.0  # one survivor
    x[5, 200:] = NAN
    u = torch.tensor([0.5, 0.0, U_MAX, U_MAX, U_MAX, U_MAX], dtype=torch.float64)
    ids, probs = _run(backend, x, uniforms=u)
    assert ids[:3].tolist() == [-1, -1, -1] and (probs[:3] == 0).all()
    assert ids[4] == 17 and probs[4, 17] == 1.0
    assert (ids[3:] >= 0).all() and probs[3, 5] == 0 and (probs[5, 200:] == 0).all()
    assert _zero_free(probs, ids) and torch.equal(ids, contract_draw(probs, u))
    g, _ = _run(backend, x, temperature=0.0)  # greedy: the same rows have no id
    assert g[:3].tolist() == [-1, -1, -1] and g[4] == 17


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_logits_extreme_uniforms_random_rows(backend):
    """Issue 15's reproduction: u = 1 - 2^-24 with top_k = 128 drew id 255 (p = 0) on 581 of 4096 Triton rows.
    Random logits, so probabilities are the backend's own: the draw must be the contract's on them."""
    _need(backend)
    g = torch.Generator().manual_seed(15)
    x = torch.randn(1024, V, generator=g) * 3
    for i, kw in enumerate([dict(top_k=128), dict(top_p=0.7), dict(top_k=40, top_p=0.9), dict()]):
        for uv in (U_MAX, 0.0, U_MIN):
            rows = x if (i == 0 and uv == U_MAX) else x[256 * i:256 * (i + 1)]  # the case on 1024 rows
            u = torch.full((rows.shape[0],), uv, dtype=torch.float64)
            ids, probs = _run(backend, rows, uniforms=u, **kw)
            assert _zero_free(probs, ids), f"{kw}, u={uv}: a zero-probability id"
            assert torch.equal(ids, contract_draw(probs, u)), f"{kw}, u={uv}"
            if uv == 0.0:  # u = 0: the first entry with mass
                assert torch.equal(ids, (probs > 0).int().argmax(-1))


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_logits_top_k_one_top_p_to_zero_greedy(backend):
    _need(backend)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, V, generator=g) * 2
    x[::4, 3] = x[::4].amax(-1) + 1.0  # a unique maximum at column 3 in every 4th row
    x[1::4, 9] = x[1::4, 200] = x[1::4].amax(-1) + 1.0  # a tied maximum at 9 and 200
    x[2::4, 0] = INF  # +inf: the maximum
    u = torch.tensor([0.0, U_MIN, 0.5, U_MAX, 0.5 - 2 ** -24], dtype=torch.float64)[torch.arange(64) % 5]
    first_max = torch.nan_to_num(x, posinf=torch.finfo(torch.float32).max).argmax(-1)
    for kw in (dict(top_k=1), dict(top_p=1e-30), dict(top_k=1, top_p=1e-30), dict(top_k=2, top_p=1e-7)):
        ids, probs = _run(backend, x, uniforms=u, **kw)
        assert torch.equal(ids, contract_draw(probs, u)) and _zero_free(probs, ids)
        tied = torch.arange(64) % 4 == 1
        assert torch.equal(ids[~tied], first_max[~tied]), kw  # only the maximum survives
        # the tie group survives whole: p = 1/2 each, u < 1/2 -> column 9, u >= 1/2 -> column 200
        assert (probs[tied][:, [9, 200]] == 0.5).all()
        assert torch.equal(ids[tied], torch.where(u[tied] < 0.5, 9, 200))
    ids, probs = _run(backend, x, temperature=0.0, uniforms=u)
    assert torch.equal(ids, first_max) and torch.equal(probs.argmax(-1), first_max)


@pytest.mark.parametrize("backend", SAMPLE_BACKENDS)
def test_sample_logits_per_row_cfg(backend):
    _need(backend)
    _, surv = _tie_rows(48, seed=3)
    n = len(surv)
    cond = torch.full((n, V), -INF)  # survivors tie in both halves, so they tie after the mix; the rest -inf in
    for r, cols in enumerate(surv):  # cond, anything in uncond: the mix gives -inf there for every cfg > 0
        cond[r, cols] = float(r % 5) - 2.0
    uncond = torch.where(cond > -INF, cond * 2 + 1, torch.randn(n, V) * 3)
    cfg = torch.tensor([1.5, 3.0, 0.5, 1.0, 4.0, 2.0] * (n // 6))
    u, want = _tie_uniforms(surv, 0)
    ids, probs = _run(backend, cond, uncond, cfg=cfg, filter_threshold=1e-3, uniforms=u)
    exact = torch.zeros(n, V)
    for r, cols in enumerate(surv):
        exact[r, cols] = 1.0 / len(cols)
    assert torch.equal(probs, exact) and torch.equal(ids, want)
    # random halves and per-row cfg: the contract's draw on the backend's own probabilities
    g = torch.Generator().manual_seed(5)
    c, uc = torch.randn(256, V, generator=g) * 3, torch.randn(256, V, generator=g) * 3
    cfg = torch.linspace(0.5, 5.0, 256)
    u = torch.tensor([0.0, U_MIN, U_MAX, 0.5] * 64, dtype=torch.float64)
    ids, probs = _run(backend, c, uc, cfg=cfg, filter_threshold=1e-4, top_p=0.8, uniforms=u)
    assert _zero_free(probs, ids) and torch.equal(ids, contract_draw(probs, u))
    ref_ids, ref_probs = sample_logits_reference(c, uc, cfg=cfg, inv_temperature=1.0,
                                                 filter_threshold=1e-4, top_p=0.8, top_k=0, uniforms=u, greedy=False)
    same = (probs == ref_probs).all(-1)  # rows whose probabilities agree bit for bit agree on the id
    assert torch.equal(ids[same], ref_ids[same])


# ---------------------------------------------------------------- pixel_head_sample's draw

HEAD_BACKENDS = ["torch", "cpu", "triton"]
C_IN = 16


def _head(seed=0, zero_codebooks=False, bias=None):
    torch.manual_seed(seed)
    m = PixelLoss(c_channels=C_IN, width=16, depth=1, num_heads=2).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "codebook" in name:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            elif p.dim() == 1:
                p.normal_(1, 0.2)
    w = pack_pixel_head_weights(m)
    if zero_codebooks:  # logits = 0 @ ... + mlm_bias exactly: the bias alone sets each channel's distribution
        w = w._replace(codebooks=torch.zeros_like(w.codebooks), mlm_bias=bias)
    return w


def _head_need(backend):
    _need(backend)
    if backend == "cpu" and not cpu.status()[0]:
        pytest.skip(f"compiled CPU kernel unavailable: {cpu.status()[1]}")


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
def test_pixel_head_draw_on_exact_distributions(backend):
    _head_need(backend)
    # channel c's survivors tie at 0 (the rest -inf or NaN): p = 1 / n exactly whatever the hidden state
    surv = [[0, 37, 128, 255], [5, 6], list(range(0, 256, 32))]
    bias = torch.full((3, V), -INF)
    bias[1] = NAN
    for c, cols in enumerate(surv):
        bias[c, cols] = 0.0
    w = _head(zero_codebooks=True, bias=bias)
    bsz = 40
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(2 * bsz, C_IN, generator=g)
    u = torch.empty(3, bsz, dtype=torch.float64)
    want = torch.empty(bsz, 3, dtype=torch.int64)
    for c, cols in enumerate(surv):
        uc, wc = _tie_uniforms([cols] * bsz, c)
        u[c], want[:, c] = uc, wc
    for kw in (dict(), dict(cfg=torch.linspace(0.5, 4.0, bsz), filter_threshold=1e-3), dict(cfg=3.0, top_p=0.3)):
        ids = pixel_head_sample(cond if kw else cond[:bsz], w, 2, uniforms=u, backend=backend, **kw)
        assert last_backend("pixel_head_sample") == backend
        assert torch.equal(ids, want), kw  # with top_p = 0.3 too: tied survivors are kept together
    ids = pixel_head_sample(cond, w, 2, cfg=2.0, temperature=0.0, backend=backend)  # greedy: the first survivor
    assert torch.equal(ids, torch.tensor([cols[0] for cols in surv]).expand(bsz, 3))
    # the exponential race is another draw (torch.multinomial's): argmax(p / e), untouched by the contract
    e = torch.empty(3, bsz, V).exponential_(generator=torch.Generator().manual_seed(2))
    ids = pixel_head_sample(cond, w, 2, cfg=2.0, exponentials=e, backend=backend)
    p = torch.zeros(3, V)
    for c, cols in enumerate(surv):
        p[c, cols] = 1.0 / len(cols)
    assert torch.equal(ids, (p[:, None, :] / e).argmax(-1).t())
    # all filtered in channel 1: -1 there and in every later channel
    dead = bias.clone()
    dead[1] = NAN
    ids = pixel_head_sample(cond, _head(zero_codebooks=True, bias=dead), 2, cfg=2.0, uniforms=u, backend=backend)
    assert torch.equal(ids[:, 0], want[:, 0]) and (ids[:, 1:] == -1).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_pixel_head_draw_extreme_uniforms_random_weights(backend):
    """The kernels' own logits -> the reference's probabilities -> the contract's draw, channel by channel,
    at u = 1 - 2^-24 / 0 / 2^-24 (the largest uniform clamped ids to 255 on the old Triton pixel head)."""
    _head_need(backend)
    w = _head(seed=4)
    bsz = 128
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(2 * bsz, C_IN, generator=g)
    launch = _launch_cpu if backend == "cpu" else _launch_triton
    exempt = 0
    for uv, top_p in ((U_MAX, 0.5), (U_MAX, 1.0), (0.0, 0.9), (U_MIN, 1.0)):
        u = torch.full((3, bsz), uv, dtype=torch.float64)
        ids = torch.empty(bsz, 3, dtype=torch.int64)
        logits = torch.full((3, 2 * bsz, V), NAN)
        launch(cond, w, 2, True, None, 3.0, 1.0, 1e-4, top_p, False, u, 0, 0, 0, ids, logits=logits)
        for c in range(3):
            _, probs = sample_logits_reference(logits[c, :bsz], logits[c, bsz:], cfg=3.0, inv_temperature=1.0,
                                               filter_threshold=1e-4, top_p=top_p, top_k=0, uniforms=u[c],
                                               greedy=False)
            assert _zero_free(probs, ids[:, c]), f"u={uv}, top_p={top_p}, channel {c}: a zero-probability id"
            want = contract_draw(probs, u[c])
            # ids may flip only where a step of the CDF (not the total, which t never reaches) lies within
            # the kernels' rounding of t
            cdf = probs.double().cumsum(-1)
            step = (probs > 0) & (cdf < cdf[:, -1:])
            near = (((cdf - u[c, :, None] * cdf[:, -1:]).abs() < 1e-6) & step).any(-1)
            assert torch.equal(ids[~near, c], want[~near]), f"u={uv}, top_p={top_p}, channel {c}"
            exempt += int(near.sum())
    assert exempt <= 0.05 * 12 * bsz
