"""Every entry of the three reference fixtures, reproduced in fp32 on CPU.

Tolerance: the README of the fixtures says a faithful fp32 CPU implementation matches to ~1e-5
relative; we assert atol 1e-5 + rtol 1e-5 (observed: bit-exact, error 0.0, on torch 2.13 CPU).
Pixel ids / sampled pixels are discrete and must match exactly.
"""
import pytest
import torch

from fractal_kernels.reference import inverse_cdf_draw
from tests.conftest import load_fixture

ATOL = RTOL = 1e-5


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def pixel_heads(model, data):
    levels = model.levels()
    heads = [("pixel", levels[-1])]
    for i, gen in enumerate(levels[:-1]):
        if getattr(gen, "guiding_pixel", False):
            heads.append((f"level{i}.guiding_pixel", gen.guiding_pixel_loss))
    assert all(f"{pre}.logits" in data for pre, _ in heads)
    return heads


def test_every_entry_is_covered(fixture_model):
    """Guard: the entries this file checks are exactly the fixture's entries (none silently skipped)."""
    name, model, data = fixture_model
    covered = {"state_dict"}
    for i, _ in enumerate(model.levels()[:-1]):
        covered |= {f"level{i}.{k}" for k in ("kind", "x", "cond_list", "mask", "predict")}
    for pre, _ in pixel_heads(model, data):
        covered |= {f"{pre}.{k}" for k in ("target_ids", "target", "cond_list", "logits", "loss_eval", "loss_train")}
        covered |= {f"{pre}.sample{k}.{f}" for k in range(3) for f in ("settings", "cond_list", "uniforms", "probs", "pixels")}
    covered |= {"model.loss_eval", "model.imgs_uint8", "model.imgs", "model.labels"}
    assert set(data) <= covered, sorted(set(data) - covered)


def test_level_predict(fixture_model):
    name, model, data = fixture_model
    for i, gen in enumerate(model.levels()[:-1]):
        pre = f"level{i}"
        assert data[f"{pre}.kind"] == type(gen).__name__.lower()
        cond = list(data[f"{pre}.cond_list"])
        with torch.no_grad():
            if data[f"{pre}.kind"] == "mar":
                out = gen.predict(data[f"{pre}.x"], data[f"{pre}.mask"], cond)
            else:
                out = gen.predict(data[f"{pre}.x"], cond)
        expected = data[f"{pre}.predict"]
        assert len(out) == len(expected)
        for a, b in zip(out, expected):
            close(a, b)


def test_pixel_head_logits_and_losses(fixture_model):
    name, model, data = fixture_model
    for pre, head in pixel_heads(model, data):
        cond = list(data[f"{pre}.cond_list"])
        with torch.no_grad():
            logits, ids = head.predict(data[f"{pre}.target"], cond)
            assert torch.equal(ids, data[f"{pre}.target_ids"])
            close(logits, data[f"{pre}.logits"])
            head.eval()
            close(head(data[f"{pre}.target"], cond), data[f"{pre}.loss_eval"])
            head.train()
            close(head(data[f"{pre}.target"], cond), data[f"{pre}.loss_train"])
            head.eval()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_pixel_head_sampling(fixture_model, k):
    name, model, data = fixture_model
    for pre, head in pixel_heads(model, data):
        s = f"{pre}.sample{k}"
        temperature, cfg, threshold = data[f"{s}.settings"].tolist()
        u = data[f"{s}.uniforms"]
        with torch.no_grad():
            pixels, probs = head.sample(list(data[f"{s}.cond_list"]), temperature, cfg, threshold,
                                        draw=lambda p, c: inverse_cdf_draw(p, u[c]), return_probs=True)
        torch.testing.assert_close(probs, data[f"{s}.probs"], atol=1e-6, rtol=0)
        assert torch.equal(pixels, data[f"{s}.pixels"])


def test_whole_model_eval_loss():
    """Only the AR fixture has a whole-model entry (its eval pass is deterministic)."""
    from fractal_models import FractalGen
    from fractal_models.sampling import normalize_uint8
    meta, data = load_fixture("tiny_ar")
    model = FractalGen(**meta["constructor"])
    model.load_state_dict(data["state_dict"], strict=True)
    model.eval()
    torch.testing.assert_close(normalize_uint8(data["model.imgs_uint8"]), data["model.imgs"], atol=1e-6, rtol=0)
    with torch.no_grad():
        close(model(data["model.imgs"], data["model.labels"]), data["model.loss_eval"])
