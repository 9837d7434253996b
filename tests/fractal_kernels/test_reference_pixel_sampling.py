"""Reference pixel-sampling math: CFG/filter semantics, top-p, inverse-CDF draws."""
import pytest
import torch

from fractal_kernels.reference.pixel_sampling import (
    cfg_filter_mix_reference,
    inverse_cdf_draw,
    pixel_probs_reference,
    top_p_filter,
)


def literal_reference(logits, temperature, cfg, threshold):
    """The reference's statements (masked in-place assignment) written out, for comparison."""
    logits = logits * temperature
    bsz = logits.shape[0] // 2
    cond, uncond = logits[:bsz], logits[bsz:].clone()
    mask = torch.softmax(cond, dim=-1) < threshold
    uncond[mask] = torch.max(uncond, cond - torch.max(cond, dim=-1, keepdim=True)[0]
                             + torch.max(uncond, dim=-1, keepdim=True)[0])[mask]
    return torch.softmax(uncond + cfg * (cond - uncond), dim=-1)


@pytest.mark.parametrize("temperature, cfg, threshold", [(1.0, 3.0, 1e-4), (0.9, 1.5, 1e-2), (1.3, 0.5, 0.0)])
def test_matches_literal_reference(temperature, cfg, threshold):
    logits = torch.randn(10, 256) * 3
    got = pixel_probs_reference(logits, temperature=temperature, cfg=cfg, filter_threshold=threshold, guided=True)
    assert torch.equal(got, literal_reference(logits, temperature, cfg, threshold))


def test_per_row_cfg():
    cond, uncond = torch.randn(4, 256), torch.randn(4, 256)
    cfg = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mixed = cfg_filter_mix_reference(cond, uncond, cfg, 0.0)
    for i in range(4):
        torch.testing.assert_close(mixed[i], cfg_filter_mix_reference(cond[i:i + 1], uncond[i:i + 1], float(cfg[i]), 0.0)[0])
    with pytest.raises(ValueError, match="cfg: expected a scalar or 4 per-row values"):
        cfg_filter_mix_reference(cond, uncond, torch.ones(3), 0.0)


def test_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    out = top_p_filter(probs, 0.7)
    torch.testing.assert_close(out[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert (out[1] > 0).sum() == 4  # ties are kept together: all four equal entries stay
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    tiny = top_p_filter(probs, 1e-9)
    assert torch.equal((tiny > 0).sum(-1), torch.tensor([1, 4]))  # always keeps the argmax (with its ties)


def test_top_k_and_mass_above():
    from fractal_kernels.reference.pixel_sampling import _mass_at_or_above, top_k_filter
    probs = torch.tensor([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1]])
    torch.testing.assert_close(_mass_at_or_above(probs), torch.tensor([[1.0, 0.8, 1.0, 0.8], [0.7, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(top_k_filter(probs, 1), torch.tensor([[0.0, 0.5, 0.0, 0.5], [1.0, 0, 0, 0]]))
    torch.testing.assert_close(top_k_filter(probs, 2)[1], torch.tensor([0.7, 0.1, 0.1, 0.1]))  # tie at the 2nd
    assert torch.equal(top_k_filter(probs, 4), probs) and torch.equal(top_k_filter(probs, 0), probs)
    # top-p against a brute-force definition: keep i iff mass strictly above p_i < top_p
    p = torch.softmax(torch.randn(50, 32), -1)
    for top_p in (0.1, 0.5, 0.9, 0.999):
        above = (p[:, None, :] * (p[:, None, :] > p[:, :, None])).sum(-1)
        assert torch.equal(top_p_filter(p, top_p) > 0, above < top_p)


def test_inverse_cdf_draw_edges_and_ties():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 4)
    u = torch.tensor([0.0, 0.5, 0.5000001, 0.9999999], dtype=torch.float64)
    # u = 0 -> the first entry with positive mass (never a zero-probability one); u = 0.5 sits exactly on the
    # step after entry 1: the contract's half-open intervals [C_{i-1}, C_i) give it to the next entry with mass
    assert inverse_cdf_draw(probs, u).tolist() == [1, 3, 3, 3]
    unnormalised = torch.tensor([[2.0, 6.0]])
    assert inverse_cdf_draw(unnormalised, torch.tensor([0.3])).tolist() == [1]


def test_inverse_cdf_draw_distribution():
    probs = torch.softmax(torch.randn(1, 256), -1)
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = inverse_cdf_draw(probs.expand(u.numel(), 256), u)
    freq = torch.bincount(ids, minlength=256).double() / u.numel()
    # 5 sigma per bin with n = 2e5: |f - p| <= 5 sqrt(p (1 - p) / n)
    bound = 5 * (probs[0].double() * (1 - probs[0].double()) / u.numel()).sqrt() + 1e-6
    assert ((freq - probs[0].double()).abs() <= bound).all()
