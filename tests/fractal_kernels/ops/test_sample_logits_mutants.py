"""The sampler kernel's edges that random inputs do not reach (mutation survivors, issue #27 item 5): uniforms
at and past the ends of [0, 1) (and NaN), and a conditional probability exactly at the filter threshold."""
import pytest
import torch

from fractal_kernels.ops.sample_logits import sample_logits

from tests.fractal_kernels.ops.test_sample_logits import logits, reference


def test_uniforms_at_and_past_the_ends_of_the_unit_interval():
    # u <= 0 and NaN draw the first id with mass, u >= 1 the last (the contract's clamps), like the reference
    u = torch.tensor([0.0, -0.5, float("nan"), 1.0, 1.5, 0.999999, 1e-300], dtype=torch.float64)
    cond = logits(len(u), 37, 11)
    ids = sample_logits(cond, uniforms=u, backend="triton")
    ref_ids, _ = reference(cond, None, u)
    assert torch.equal(ids, ref_ids)
    assert ids[0] == ids[1] == ids[2] and ids[3] == ids[4]


def test_conditional_probability_exactly_at_the_filter_threshold_is_kept():
    # two equal conditional logits: each probability is exactly 0.5, the threshold; the filter lifts only below
    cond = torch.zeros(3, 2)
    uncond = torch.tensor([[-4.0, 1.0], [2.0, -3.0], [0.5, 0.25]])
    probs = torch.empty(3, 2)
    u = torch.full((3,), 0.5, dtype=torch.float64)
    sample_logits(cond, uncond, cfg=2.0, filter_threshold=0.5, uniforms=u, out_probs=probs, backend="triton")
    _, ref = reference(cond, uncond, u, cfg=2.0, filter_threshold=0.5)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=0)
    lifted = torch.empty(3, 2)
    sample_logits(cond, uncond, cfg=2.0, filter_threshold=0.5001, uniforms=u, out_probs=lifted, backend="triton")
    assert not torch.allclose(probs, lifted)  # just above the threshold the lift changes the mix


def test_filter_on_large_logits_does_not_overflow():
    # softmax(x) of the filter is taken as exp(x - max): logits near 80 overflow exp(x) in fp32
    cond, uncond = logits(6, 64, 12) + 80.0, logits(6, 64, 13)
    u = torch.rand(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probs = torch.empty(6, 64)
    sample_logits(cond, uncond, cfg=2.0, filter_threshold=1e-3, uniforms=u, out_probs=probs, backend="triton")
    _, ref = reference(cond, uncond, u, cfg=2.0, filter_threshold=1e-3)
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.5), dict(temperature=0.0)],
                         ids=["top_k", "top_p", "greedy"])
def test_rows_without_a_finite_logit_stay_empty_under_every_filter(kw):
    x = logits(3, 20, 14)
    x[1] = float("nan")
    x[2] = float("-inf")
    probs = torch.full((3, 20), 7.0)
    ids = sample_logits(x, uniforms=torch.full((3,), 0.5, dtype=torch.float64), out_probs=probs, backend="triton",
                        **kw)
    assert ids[1] == ids[2] == -1 and ids[0] >= 0
    assert torch.equal(probs[1:], torch.zeros(2, 20))
    assert torch.isfinite(probs[0]).all() and abs(float(probs[0].sum()) - 1.0) < 1e-5
