"""generate / sample: shapes, range, determinism, CFG, KV cache, conditional prediction, bad inputs."""
import math

import pytest
import torch

from fractal_kernels.reference.pixel_sampling import pixel_probs_reference
from fractal_models import FractalGen, build_model, generate, uniform_draw
from fractal_models.sampling import normalize_uint8, to_uint8

ITERS = {"tiny_mar": [4, 4], "tiny_ar": [16, 16], "tiny_mar_gp": [4, 2, 2]}


def seeded_uniforms(seed):
    g = torch.Generator().manual_seed(seed)
    calls = []

    def uniforms(n, channel):
        calls.append((n, channel))
        return torch.rand(n, generator=g, dtype=torch.float64)
    return uniforms, calls


def test_shape_range_and_seed_determinism(fixture_model):
    name, model, _ = fixture_model
    labels = torch.tensor([0, 3, 9])
    a = generate(model, labels, num_iter_list=ITERS[name], cfg=2.0, seed=7)
    b = generate(model, labels, num_iter_list=ITERS[name], cfg=2.0, seed=7)
    c = generate(model, labels, num_iter_list=ITERS[name], cfg=2.0, seed=8)
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the caller's RNG state is left untouched by a seeded call
    torch.manual_seed(123)
    before = torch.rand(4)
    torch.manual_seed(123)
    generate(model, labels, num_iter_list=ITERS[name], seed=1)
    assert torch.equal(torch.rand(4), before)


def test_generate_matches_reference_call(fixture_model):
    """generate() is the reference evaluation's call (class embedding + fake latent halves + sample)."""
    name, model, _ = fixture_model
    labels = torch.tensor([1, 2])
    got = generate(model, labels, num_iter_list=ITERS[name], cfg=3.0, temperature=1.1, seed=3)
    torch.manual_seed(3)
    with torch.no_grad():
        emb = model.class_emb(labels)
        emb = torch.cat([emb, model.fake_latent.repeat(2, 1)], dim=0)
        num_conds = getattr(model.generator, "num_conds", 1)
        imgs = model.sample([emb for _ in range(num_conds)], ITERS[name], 3.0, "linear", 1.1, 1e-4, 0)
    assert torch.equal(got, to_uint8(imgs))


def test_cfg_one_is_the_unguided_path(fixture_model):
    """cfg=1 uses only the conditional half; CFG mixing with cfg=1 gives the conditional probabilities."""
    name, model, _ = fixture_model
    labels = torch.tensor([4, 5])
    u1, calls1 = seeded_uniforms(0)
    a = generate(model, labels, num_iter_list=ITERS[name], cfg=1.0, draw=uniform_draw(u1), seed=0)
    torch.manual_seed(0)
    u2, _ = seeded_uniforms(0)
    with torch.no_grad():
        emb = model.class_emb(labels)
        num_conds = getattr(model.generator, "num_conds", 1)
        ref = model.sample([emb] * num_conds, ITERS[name], 1.0, "linear", 1.0, 1e-4, 0, draw=uniform_draw(u2))
    assert torch.equal(a, to_uint8(ref))
    # every sub-pixel drawn exactly once, plus (tiny_mar_gp) one guiding pixel per 4x4 and per 2x2 patch
    expected = 2 * 16 * 16 + (2 * 16 + 2 * 64 if name == "tiny_mar_gp" else 0)
    for channel in range(3):
        assert sum(n for n, c in calls1 if c == channel) == expected
    logits = torch.randn(6, 256)
    guided = pixel_probs_reference(torch.cat([logits, logits + torch.randn(6, 256)]), temperature=1.0, cfg=1.0,
                                   filter_threshold=0.0, guided=True)
    torch.testing.assert_close(guided, torch.softmax(logits, -1), atol=1e-6, rtol=1e-5)


def test_ar_kv_cache_equals_uncached_pass():
    from tests.conftest import load_fixture
    meta, data = load_fixture("tiny_ar")
    model = FractalGen(**meta["constructor"])
    model.load_state_dict(data["state_dict"])
    model.eval()
    gen = model.generator
    cond = [torch.randn(4, 64)]
    outs = {}
    for use_cache in (True, False):
        seen = []

        def next_fn(cond_list, cfg, temperature, filter_threshold):
            seen.append(cond_list[0].clone())
            return torch.randn(cond_list[0].shape[0], 3, 4, 4, generator=g)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            img = gen.sample(list(cond), 16, 1.0, "constant", 1.0, 0.0, next_fn, use_cache=use_cache)
        outs[use_cache] = (img, torch.stack(seen))
    torch.testing.assert_close(outs[True][1], outs[False][1], atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[True][0], outs[False][0])
    # and the uncached per-step conditions equal one full teacher-forced predict on the final patches
    with torch.no_grad():
        full = gen.predict(gen.patchify(outs[False][0]), cond)[0]
    torch.testing.assert_close(outs[False][1].transpose(0, 1), full, atol=1e-5, rtol=1e-5)
    assert all(b.attention.kv_cache is None for b in gen.blocks)  # caches released


def masks(kind):
    g = torch.Generator().manual_seed(1)
    m = torch.zeros(3, 3, 16, 16, dtype=torch.bool)
    if kind == "inpaint":  # known everywhere except a centre hole
        m[:] = True
        m[:, :, 4:12, 5:11] = False
    elif kind == "outpaint":  # left half known
        m[:, :, :, :8] = True
    elif kind == "uncrop":  # centre known
        m[:, :, 4:12, 4:12] = True
    elif kind == "random":  # scattered pixels and single channels
        m = torch.rand(3, 3, 16, 16, generator=g) < 0.4
    return m


@pytest.mark.parametrize("kind", ["inpaint", "outpaint", "uncrop", "random"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_conditional_prediction_keeps_known_pixels(fixture_model, kind, cfg):
    name, model, _ = fixture_model
    labels = torch.tensor([0, 1, 2])
    known = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    mask = masks(kind)
    out = generate(model, labels, num_iter_list=ITERS[name], cfg=cfg, seed=0, known=known, known_mask=mask)
    assert torch.equal(out[mask], known[mask])
    assert (out[~mask] != known[~mask]).float().mean() > 0.9  # the rest is sampled, not copied


def test_conditional_prediction_edge_cases(fixture_model):
    name, model, _ = fixture_model
    labels = torch.tensor([6, 7])
    known = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    # nothing known: identical to plain generation with the same seed
    none = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    for cfg in (1.0, 3.0):
        a = generate(model, labels, num_iter_list=ITERS[name], cfg=cfg, seed=4, known=known, known_mask=none)
        b = generate(model, labels, num_iter_list=ITERS[name], cfg=cfg, seed=4)
        assert torch.equal(a, b)
    # everything known: returned as is, and no pixel is ever drawn
    u, calls = seeded_uniforms(0)
    full = torch.ones(2, 16, 16, dtype=torch.bool)
    out = generate(model, labels, num_iter_list=ITERS[name], cfg=2.0, known=known, known_mask=full, draw=uniform_draw(u))
    assert torch.equal(out, known) and calls == []


def test_known_values_round_trip_exactly():
    x = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(1, 3, 16, 16)
    assert torch.equal(to_uint8(normalize_uint8(x)), x)


def test_top_p_restricts_support():
    model = build_model("tiny_mar").eval()
    u, _ = seeded_uniforms(0)
    seen = []

    def recording_draw(probs, channel):
        seen.append(probs)
        return uniform_draw(u)(probs, channel)
    generate(model, torch.tensor([0]), num_iter_list=[2, 2], top_p=0.3, draw=recording_draw, seed=0)
    for p in seen:
        kept = p > 0
        # the kept set is the top of the distribution and has mass >= 0.3 before renormalising
        assert kept.sum(-1).min() >= 1
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]), atol=1e-5, rtol=0)


def test_progress_bar_runs(capsys):
    model = build_model("tiny_ar").eval()
    out = generate(model, torch.tensor([0]), progress=True, seed=0)
    assert out.shape == (1, 3, 16, 16)
    assert "generate" in capsys.readouterr().err


def test_empty_batch():
    model = build_model("tiny_mar").eval()
    assert generate(model, torch.tensor([], dtype=torch.long)).shape == (0, 3, 16, 16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=torch.tensor([10])), r"labels: values must be in \[0, 10\)"),
    (dict(labels=torch.tensor([-1])), "labels: values must be in"),
    (dict(labels=torch.tensor([1.0])), "labels: expected an integer tensor"),
    (dict(labels=torch.tensor([[1]])), r"labels: expected shape \[B\]"),
    (dict(temperature=0.0), "temperature: expected a finite number > 0"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(cfg=float("inf")), "cfg: expected a finite number"),
    (dict(cfg_schedule="cosine"), "cfg_schedule"),
    (dict(top_p=0.0), r"top_p: expected a value in \(0, 1\]"),
    (dict(num_iter_list=[4]), "num_iter_list: expected 2 positive integers"),
    (dict(known=torch.zeros(1, 3, 8, 8, dtype=torch.uint8), known_mask=torch.ones(1, 3, 8, 8, dtype=torch.bool)),
     r"known: expected shape \(1, 3, 16, 16\)"),
    (dict(known=torch.zeros(1, 3, 16, 16), known_mask=torch.ones(1, 3, 16, 16, dtype=torch.bool)),
     "known: expected a uint8 tensor"),
    (dict(known=torch.zeros(1, 3, 16, 16, dtype=torch.uint8), known_mask=torch.ones(1, 3, 15, 16, dtype=torch.bool)),
     "known_mask: expected shape"),
    (dict(known=torch.zeros(1, 3, 16, 16, dtype=torch.uint8), known_mask=torch.ones(1, 3, 16, 16)),
     "known_mask: expected a bool tensor"),
    (dict(known=torch.zeros(1, 3, 16, 16, dtype=torch.uint8)), "known and known_mask must be given together"),
])
def test_bad_inputs_name_the_argument(kwargs, match):
    model = build_model("tiny_mar").eval()
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels", torch.tensor([0]))
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, labels, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_generate_bf16_autocast():
    model = build_model("tiny_mar").cuda().eval()
    a = generate(model, torch.tensor([0, 1], device="cuda"), num_iter_list=[4, 4], seed=0, autocast_dtype=torch.bfloat16)
    b = generate(model, torch.tensor([0, 1], device="cuda"), num_iter_list=[4, 4], seed=0, autocast_dtype=torch.bfloat16)
    assert a.device.type == "cuda" and a.dtype == torch.uint8 and torch.equal(a, b)
