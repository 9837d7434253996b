"""The row kernel's edges that the op-level tests cannot reach (mutation survivors, issue #27 item 5).

On CUDA the op skips the host's target check (no sync), so an out-of-range target reaches the kernel, which
must make exactly that row NaN. Here the launcher is called directly, as a GPU run without the check would.
"""
import pytest
import torch

from fractal_kernels.ops.pixel_cross_entropy import launch


def _loss_rows(logits, target, ignore_index=-100):
    loss = torch.empty(logits.shape[0])
    launch._rows(logits.clone(), target, loss, ignore_index, False, None, "triton")
    return loss


@pytest.mark.parametrize("bad", [-1, 37, 38])
def test_out_of_range_target_is_a_nan_row_and_only_that_row(bad):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 37, generator=g)
    # the edges of the valid range beside the bad row: 0 and V-1 are valid targets, ignore_index adds 0
    target = torch.tensor([0, 36, bad, -100, 5])
    loss = _loss_rows(logits, target)
    ref = torch.logsumexp(logits.double(), 1) - logits.double()[torch.arange(5), target.clamp(0, 36)]
    assert torch.isnan(loss[2]) and loss[3] == 0
    torch.testing.assert_close(loss[[0, 1, 4]].double(), ref[[0, 1, 4]], atol=1e-5, rtol=1e-6)
