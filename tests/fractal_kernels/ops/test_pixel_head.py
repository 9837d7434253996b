"""fractal_kernels.pixel_head_sample: the fused pixel head (Triton, interpreter on CPU) against its reference, and
the reference against ``PixelLoss.sample`` itself.

Tolerances: ids are compared exactly in fp32 (the logits agree to ~2e-6; a uniform would have to land within
~1e-6 of a CDF boundary to flip an id, and the seeds here are fixed, so "exact" is deterministic, not lucky);
logits atol 1e-5 (fp32 GEMM / reduction order). bf16 weights: kernel == reference on the same bf16 weights
(both upcast on load) exactly; against the fp32 weights only a loose bound (bf16 rounding of the weights moves the
logits by ~1e-2 and so changes a genuine ~10% of draws, compounding over channels). Statistics: chi-square
of Philox draws against the head's own probabilities, bound df + 6 sqrt(2 df) (about 4 sigma).
"""
import functools
import math

import pytest
import torch

from fractal_kernels import cpu, pixel_head_sample
from fractal_kernels.dispatch import BackendUnavailable, last_backend
from fractal_kernels.ops.pixel_head import PixelHeadConfig, _launch_cpu, _launch_triton
from fractal_kernels.reference.philox import philox_uniform
from fractal_kernels.reference.pixel_head import pack_pixel_head_weights, pixel_head_sample_reference
from fractal_models.pixelloss import PIX_MEAN, PIX_STD, PixelLoss
from fractal_models.sampling import uniform_draw

C = 32
CONFIGS = [(16, 1, 2), (32, 2, 2), (64, 3, 4)]  # (width, depth, heads)


@functools.lru_cache(maxsize=None)
def head(width: int, depth: int, heads: int, seed: int = 0, c_in: int = C) -> PixelLoss:
    """A PixelLoss with every parameter random (the default init gives near-flat logits and zero biases);
    ``c_in`` is the condition width."""
    torch.manual_seed(seed)
    m = PixelLoss(c_channels=c_in, width=width, depth=depth, num_heads=heads).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "codebook" in name:
                p.normal_(0, 0.3)  # logits ~ N(0, 0.3^2 W): peaked but far from one-hot
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            elif p.dim() == 1:  # LayerNorm scales
                p.normal_(1, 0.2)
    return m


def conds(bsz: int, guided: bool, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * bsz if guided else bsz, C, generator=g)


def unis(bsz: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(3, bsz, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def module_ids(values: torch.Tensor) -> torch.Tensor:
    """PixelLoss.sample's normalised values [B, 3] -> ids."""
    return ((values * torch.tensor(PIX_STD) + torch.tensor(PIX_MEAN)) * 255).round().long()


# ---------------------------------------------------------------- (a) reference == the model's own sampling

MODEL_CASES = [
    dict(cfg=1.0, filter_threshold=0.0, top_p=1.0, temperature=1.0),
    dict(cfg=3.0, filter_threshold=1e-4, top_p=1.0, temperature=1.3),
    dict(cfg="rows", filter_threshold=1e-4, top_p=0.9, temperature=0.8),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("case", range(len(MODEL_CASES)))
def test_reference_matches_pixel_loss_sample(config, case):
    width, depth, heads = config
    m = head(*config)
    kw = dict(MODEL_CASES[case])
    bsz = 48
    if kw["cfg"] == "rows":
        kw["cfg"] = torch.linspace(1.5, 4.0, bsz)
    guided = isinstance(kw["cfg"], torch.Tensor) or kw["cfg"] != 1.0
    cond, u = conds(bsz, guided), unis(bsz)
    with torch.no_grad():
        values = m.sample([cond], kw["temperature"], kw["cfg"], kw["filter_threshold"], top_p=kw["top_p"],
                          draw=uniform_draw(lambda n, c: u[c]))
    # PixelLoss.sample multiplies by its temperature: that is the reference's inv_temperature
    ids, logits = pixel_head_sample_reference(
        cond, pack_pixel_head_weights(m), heads, guided=guided, cfg=kw["cfg"], inv_temperature=kw["temperature"],
        filter_threshold=kw["filter_threshold"], top_p=kw["top_p"], uniforms=u, return_logits=True)
    assert torch.equal(ids, module_ids(values))
    # the module's teacher-forced logits for the drawn ids (both halves use the same ids)
    with torch.no_grad():
        tf = m.logits_from_ids(torch.cat([ids, ids]) if guided else ids, cond)  # [rows, 3, 256]
    torch.testing.assert_close(logits, tf.permute(1, 0, 2), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- (b) triton == torch

SAMPLER_CASES = [
    dict(guided=False),
    dict(guided=False, top_p=0.9, temperature=0.7),
    dict(guided=True, cfg=2.5),
    dict(guided=True, cfg=4.0, filter_threshold=1e-4, top_p=0.9),
    dict(guided=True, cfg="rows", filter_threshold=1e-4),
    dict(guided=True, cfg="rows", top_p=0.9, temperature=1 / 1.3),
]


def _kwargs(case: dict, bsz: int) -> dict:
    kw = dict(case)
    if kw.get("cfg") == "rows":
        kw["cfg"] = torch.linspace(1.0, 5.0, bsz)
    return kw


def _both(cond, m, heads, **kw):
    w = pack_pixel_head_weights(m)
    ref = pixel_head_sample(cond, w, heads, backend="torch", **kw)
    assert last_backend("pixel_head_sample") == "torch"
    out = pixel_head_sample(cond, w, heads, backend="triton", **kw)
    assert last_backend("pixel_head_sample") == "triton"
    return ref, out


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("bsz", [1, 5, 17, 33])
@pytest.mark.parametrize("case", range(len(SAMPLER_CASES)))
def test_triton_matches_torch_grid(case, bsz, config):
    kw = _kwargs(SAMPLER_CASES[case], bsz)
    ref, out = _both(conds(bsz, kw["guided"]), head(*config), config[2], uniforms=unis(bsz), **kw)
    assert out.shape == (bsz, 3) and out.dtype == torch.int64
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kernel", ["triton", "cpu"])
@pytest.mark.parametrize("guided", [False, True])
def test_kernel_logits_and_several_programs(guided, kernel):
    """The debug path: the kernel's raw logits of every channel and row, with 3 programs (Triton) / tiles (the
    compiled CPU kernel) of 16 pixels."""
    if kernel == "cpu" and not cpu.status()[0]:
        pytest.skip(f"compiled CPU kernels unavailable: {cpu.status()[1]}")
    heads = CONFIGS[2][2]
    m = head(*CONFIGS[2])
    w = pack_pixel_head_weights(m)
    bsz = 33
    cond, u = conds(bsz, guided), unis(bsz)
    ref_ids, ref_logits = pixel_head_sample_reference(cond, w, heads, guided=guided, cfg=2.0 if guided else 1.0,
                                                      inv_temperature=1.0, filter_threshold=1e-4, top_p=0.9,
                                                      uniforms=u, return_logits=True)
    ids = torch.empty(bsz, 3, dtype=torch.int64)
    logits = torch.full((3, cond.shape[0], 256), float("nan"))
    launch = functools.partial(_launch_triton, block_b=16) if kernel == "triton" else _launch_cpu
    launch(cond, w, heads, guided, None, 2.0 if guided else 1.0, 1.0, 1e-4, 0.9, False, u, 0, 0, 0, ids, logits=logits)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(ids, ref_ids)


# the GPU's chunking (K chunks of 16, 64-column logit / hidden chunks, 16-pixel tiles, a persistent grid of 2
# programs looping over 3 tiles) in the interpreter; 16-bit weights take the split-operand dot (emulated: DOT16=2)
GPU_LIKE = PixelHeadConfig(block_b=16, kc=16, nc=64, hc=64, bk=16, dot16=2, num_warps=8, num_stages=1, max_programs=2,
                           maxnreg=None)


@pytest.mark.parametrize("guided,wdtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_gpu_chunking_matches_reference(guided, wdtype):
    heads = CONFIGS[2][2]
    m = head(*CONFIGS[2])
    w = pack_pixel_head_weights(m, wdtype)
    bsz = 37
    cond, u = conds(bsz, guided), unis(bsz)
    cfg = torch.linspace(1.0, 4.0, bsz) if guided else None
    ref_ids, ref_logits = pixel_head_sample_reference(cond, w, heads, guided=guided, cfg=cfg if guided else 1.0,
                                                      inv_temperature=1.0, filter_threshold=1e-4, top_p=0.9,
                                                      uniforms=u, return_logits=True)
    ids = torch.empty(bsz, 3, dtype=torch.int64)
    logits = torch.full((3, cond.shape[0], 256), float("nan"))
    _launch_triton(cond, w, heads, guided, cfg, 1.0, 1.0, 1e-4, 0.9, False, u, 0, 0, 0, ids, logits=logits,
                   config=GPU_LIKE)
    # bf16 weights: the fp32 operand is split into three bf16 terms, so the dots keep fp32 accuracy
    torch.testing.assert_close(logits, ref_logits, atol=1e-5 if wdtype == torch.float32 else 3e-5, rtol=0)
    assert torch.equal(ids, ref_ids)


def test_greedy_and_guided_cfg_one():
    m = head(32, 2, 2)
    bsz = 9
    ref, out = _both(conds(bsz, True), m, 2, guided=True, cfg=3.0, temperature=0.0)
    assert torch.equal(out, ref)
    # guided with cfg == 1 is the conditional distribution: the uncond rows are ignored
    cond = conds(bsz, True)
    u = unis(bsz)
    ref, out = _both(cond, m, 2, guided=True, cfg=1.0, uniforms=u)
    assert torch.equal(out, ref)
    assert torch.equal(out, pixel_head_sample(cond[:bsz], pack_pixel_head_weights(m), 2, uniforms=u, backend="torch"))


# ---------------------------------------------------------------- (c) Philox

def test_philox_same_seed_same_ids_on_both_backends():
    m = head(32, 2, 2)
    bsz = 33
    cond = conds(bsz, True)
    ref, out = _both(cond, m, 2, guided=True, cfg=3.0, filter_threshold=1e-4, seed=1234, offset=7)
    assert torch.equal(out, ref)
    # the documented counter layout: uniforms[c, b] = Philox(seed, offset + c * B + b)
    u = philox_uniform(1234, 7, 3 * bsz).reshape(3, bsz)
    w = pack_pixel_head_weights(m)
    assert torch.equal(pixel_head_sample(cond, w, 2, cfg=3.0, filter_threshold=1e-4, uniforms=u, backend="triton"), out)
    other = pixel_head_sample(cond, w, 2, cfg=3.0, filter_threshold=1e-4, seed=1235, offset=7, backend="triton")
    assert not torch.equal(other, out)
    # seed=None draws the seed from the generator
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = pixel_head_sample(cond, w, 2, cfg=3.0, generator=g1, backend="triton")
    b = pixel_head_sample(cond, w, 2, cfg=3.0, generator=g2, backend="torch")
    assert torch.equal(a, b)


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple:
    """Pearson chi-square with bins of expected count < 5 merged into one; (statistic, bound)."""
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return stat, df + 6 * math.sqrt(2 * df)


def test_philox_distribution():
    """One condition repeated n times: channel-0 ids ~ its softmax; channel-1 ids given the most common R ~ the
    head's channel-1 softmax for that R (the kernel's whole pixel, not just the first draw)."""
    heads = CONFIGS[0][2]
    m = head(*CONFIGS[0])
    w = pack_pixel_head_weights(m)
    n = 2048
    cond = conds(1, False).expand(n, C).contiguous()
    ids = pixel_head_sample(cond, w, heads, temperature=0.5, seed=99, backend="triton")
    with torch.no_grad():
        lg = m.logits_from_ids(torch.zeros(1, 3, dtype=torch.long), cond[:1])  # channel 0 ignores the ids
    p0 = torch.softmax(lg[0, 0] * 2.0, -1)
    stat, bound = _chi2_ok(torch.bincount(ids[:, 0], minlength=256), p0, n)
    assert stat < bound, (stat, bound)
    r = int(torch.bincount(ids[:, 0]).argmax())
    sel = ids[ids[:, 0] == r]
    assert sel.shape[0] >= 100
    with torch.no_grad():
        lg = m.logits_from_ids(torch.tensor([[r, 0, 0]]), cond[:1])
    p1 = torch.softmax(lg[0, 1] * 2.0, -1)
    stat, bound = _chi2_ok(torch.bincount(sel[:, 1], minlength=256), p1, sel.shape[0])
    assert stat < bound, (stat, bound)


# ---------------------------------------------------------------- (d) edges, errors, NaN, bf16, custom op

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("guided", [False, True])
def test_empty_batch(backend, guided):
    m = head(16, 1, 2)
    out = pixel_head_sample(torch.empty(0, C), pack_pixel_head_weights(m), 2, guided=guided,
                            cfg=2.0 if guided else 1.0, uniforms=torch.empty(3, 0), backend=backend)
    assert out.shape == (0, 3) and out.dtype == torch.int64


def test_bad_inputs_name_the_argument():
    m = head(16, 1, 2)
    w = pack_pixel_head_weights(m)
    cond = conds(4, True)
    with pytest.raises(ValueError, match="cond"):
        pixel_head_sample(cond[0], w, 2)
    with pytest.raises(ValueError, match="cond"):
        pixel_head_sample(cond[:7], w, 2, cfg=2.0)  # guided needs an even number of rows
    with pytest.raises(TypeError, match="cond"):
        pixel_head_sample(cond.long(), w, 2)
    with pytest.raises(ValueError, match="weights.cond_w"):
        pixel_head_sample(torch.randn(8, C + 1), w, 2)
    with pytest.raises(ValueError, match="weights.fc2_w"):
        pixel_head_sample(cond, w._replace(fc2_w=w.fc2_w[:, :, :-1]), 2, cfg=2.0)
    with pytest.raises(TypeError, match="weights"):
        pixel_head_sample(cond, dict(w._asdict()), 2, cfg=2.0)
    with pytest.raises(ValueError, match="num_heads"):
        pixel_head_sample(cond, w, 3, cfg=2.0)
    with pytest.raises(ValueError, match="cfg"):
        pixel_head_sample(cond, w, 2, cfg=torch.ones(3))
    with pytest.raises(ValueError, match="cfg"):
        pixel_head_sample(cond, w, 2, guided=False, cfg=2.0)
    with pytest.raises(ValueError, match="cfg"):
        pixel_head_sample(cond, w, 2, cfg=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        pixel_head_sample(cond, w, 2, cfg=2.0, temperature=-1.0)
    with pytest.raises(ValueError, match="filter_threshold"):
        pixel_head_sample(cond, w, 2, cfg=2.0, filter_threshold=2.0)
    with pytest.raises(ValueError, match="top_p"):
        pixel_head_sample(cond, w, 2, cfg=2.0, top_p=0.0)
    with pytest.raises(ValueError, match="uniforms"):
        pixel_head_sample(cond, w, 2, cfg=2.0, uniforms=torch.rand(4, 3))  # [B, 3], not [3, B]
    with pytest.raises(ValueError, match="offset"):
        pixel_head_sample(cond, w, 2, cfg=2.0, seed=1, offset=-1)
    with pytest.raises(ValueError, match="backend"):
        pixel_head_sample(cond, w, 2, cfg=2.0, backend="gpu")
    with pytest.raises(BackendUnavailable, match="pixel_head_sample.*CUDA"):
        pixel_head_sample(cond, w, 2, cfg=2.0, backend="cuda")


def test_unsupported_width_runs_on_torch_only():
    m = PixelLoss(c_channels=C, width=48, depth=1, num_heads=2).eval()
    w = pack_pixel_head_weights(m)
    cond, u = conds(3, False), unis(3)
    with pytest.raises(ValueError, match="W=48"):
        pixel_head_sample(cond, w, 2, uniforms=u, backend="triton")
    ids = pixel_head_sample(cond, w, 2, uniforms=u)  # auto on CPU: the compiled CPU kernel (any width) or torch
    assert ids.shape == (3, 3) and last_backend("pixel_head_sample") == ("cpu" if cpu.status()[0] else "torch")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on the NaN row's math
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_condition_row(backend):
    m = head(32, 2, 2)
    w = pack_pixel_head_weights(m)
    bsz = 6
    cond, u = conds(bsz, True), unis(bsz)
    clean = pixel_head_sample(cond, w, 2, cfg=2.0, filter_threshold=1e-4, uniforms=u, backend=backend)
    bad = cond.clone()
    bad[1] = float("nan")        # pixel 1's conditional row
    bad[bsz + 4, 3] = float("nan")  # pixel 4's unconditional row
    out = pixel_head_sample(bad, w, 2, cfg=2.0, filter_threshold=1e-4, uniforms=u, backend=backend)
    assert (out[[1, 4]] == -1).all()
    keep = [0, 2, 3, 5]
    assert torch.equal(out[keep], clean[keep])


def test_bf16_weights():
    heads = CONFIGS[1][2]
    m = head(*CONFIGS[1])
    w32 = pack_pixel_head_weights(m)
    w16 = pack_pixel_head_weights(m, torch.bfloat16)
    bsz = 64
    cond, u = conds(bsz, True), unis(bsz)
    ref16 = pixel_head_sample(cond, w16, heads, cfg=2.0, uniforms=u, backend="torch")
    out16 = pixel_head_sample(cond, w16, heads, cfg=2.0, uniforms=u, backend="triton")
    out16_bf16_cond = pixel_head_sample(cond.bfloat16(), w16, heads, cfg=2.0, uniforms=u, backend="triton")
    assert (out16 == ref16).float().mean() >= 0.99  # both upcast the same bf16 values: exact in practice
    assert (out16_bf16_cond == pixel_head_sample(cond.bfloat16(), w16, heads, cfg=2.0, uniforms=u,
                                                 backend="torch")).float().mean() >= 0.99
    out32 = pixel_head_sample(cond, w32, heads, cfg=2.0, uniforms=u, backend="triton")
    # bf16 weights are another model: only the first channel's draws are compared, loosely (measured ~92%)
    assert (out16[:, 0] == out32[:, 0]).float().mean() >= 0.8


def test_custom_op_is_one_profiler_event():
    m = head(16, 1, 2)
    w = pack_pixel_head_weights(m)
    cond, u = conds(4, False), unis(4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        pixel_head_sample(cond, w, 2, uniforms=u, backend="triton")
    names = [e.name for e in prof.events()]
    assert names.count("fractal_kernels::pixel_head_sample") == 1
    assert hasattr(torch.ops.fractal_kernels, "pixel_head_sample")


# ---------------------------------------------------------------- value_table: the id -> value lookup in the op

def _value_table(seed: int = 3) -> torch.Tensor:
    t = torch.randn(3, 257, generator=torch.Generator().manual_seed(seed))
    t[:, 256] = float("nan")  # the value of id -1
    return t


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on the NaN row's math
@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("guided", [False, True])
def test_value_table_returns_the_ids_values(backend, guided):
    """With ``value_table`` the op returns ``table[c, ids[:, c]]`` (fp32) for the very ids it draws without it;
    a pixel without a finite logit (id -1) gets column 256."""
    if backend == "cpu" and cpu.library() is None:
        pytest.skip(f"compiled CPU kernel unavailable: {cpu.status()[1]}")
    m = head(32, 2, 2)
    w = pack_pixel_head_weights(m)
    bsz = 7
    cond, u = conds(bsz, guided), unis(bsz)
    cond[2] = float("nan")
    table = _value_table()
    kw = dict(cfg=2.0 if guided else 1.0, filter_threshold=1e-4, uniforms=u, backend=backend)
    ids = pixel_head_sample(cond, w, 2, **kw)
    vals = pixel_head_sample(cond, w, 2, value_table=table, **kw)
    assert (ids[2] == -1).all() and ids[[0, 1, 3]].ge(0).all()
    assert vals.dtype == torch.float32 and vals.shape == (bsz, 3)
    expect = table[torch.arange(3).view(1, 3), ids]
    assert torch.equal(vals.isnan(), expect.isnan()) and vals[2].isnan().all()
    assert torch.equal(torch.nan_to_num(vals), torch.nan_to_num(expect))


def test_value_table_checks_and_empty_batch():
    m = head(16, 1, 2)
    w = pack_pixel_head_weights(m)
    cond = conds(3, False)
    for bad in (torch.zeros(3, 256), torch.zeros(3, 257, dtype=torch.float64), [[0.0] * 257] * 3):
        with pytest.raises(ValueError, match="value_table"):
            pixel_head_sample(cond, w, 2, value_table=bad, backend="torch")
    for backend in ("torch", "triton"):
        out = pixel_head_sample(cond[:0], w, 2, value_table=_value_table(), backend=backend)
        assert out.shape == (0, 3) and out.dtype == torch.float32
