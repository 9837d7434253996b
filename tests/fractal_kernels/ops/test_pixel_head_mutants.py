"""The fused pixel head's exponential-race draw on the Triton kernel (mutation survivors, issue #27 item 5):
the op tests cover that draw on the compiled CPU kernel only. Same ids as the torch backend, given the same
Exp(1) noise, for every channel and several 16-pixel tiles, guided or not."""
import pytest
import torch

from tests.fractal_kernels.ops.test_pixel_head import _both, conds, head


@pytest.mark.parametrize("guided", [False, True])
def test_exponential_race_matches_torch(guided):
    bsz = 33
    noise = torch.empty(3, bsz, 256).exponential_(generator=torch.Generator().manual_seed(4))
    kw = dict(cfg=2.0, filter_threshold=1e-4) if guided else {}
    ref, out = _both(conds(bsz, guided), head(32, 2, 2), 2, guided=guided, top_p=0.9, exponentials=noise, **kw)
    assert torch.equal(out, ref)
    # the draw reads each pixel's own noise: another channel's noise changes the ids
    ref2, out2 = _both(conds(bsz, guided), head(32, 2, 2), 2, guided=guided, top_p=0.9,
                       exponentials=noise.roll(1, dims=0), **kw)
    assert torch.equal(out2, ref2) and not torch.equal(ref2, ref)
