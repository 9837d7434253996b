"""The fused AR decode step under GPU-like chunking, on the interpreter (mutation survivors, issue #27 item 5).

The interpreter's configuration takes whole-width K / column chunks and 16 keys at once, so the chunk loops run
once and the online softmax never rescales across key chunks. Here the launcher gets a GPU-like configuration:
16-wide K and column chunks and 2-key attention chunks, over every position of the cache (up to 3 key chunks),
17 rows (two programs, a partial one). D = 32 (EVEN, unmasked) and D = 40 (head dim 20: masked chunks).
Checked step by step against the fp64 reference as in ``test_ar_stack.py``.
"""
import pytest
import torch

from fractal_kernels.ops.ar_stack import launch, pack_ar_stack

from tests.fractal_kernels.ops.test_ar_stack import check_steps, level


def _gpu_like(width, head_dim, wdtype, device):
    return launch.ArStackConfig(kc=16, nc=16, kb=2, dot16=2, num_warps=4, maxnreg=None)


@pytest.mark.parametrize("dim,heads,wdtype,bsz", [(32, 2, torch.float32, 17), (40, 2, torch.float32, 3),
                                                  (32, 2, torch.bfloat16, 2)], ids=["even", "masked", "even-bf16"])
def test_gpu_like_chunks_over_every_position(monkeypatch, dim, heads, wdtype, bsz):
    blocks, norm, freqs = level(dim, heads, 1)
    w = pack_ar_stack(blocks, norm, wdtype)
    g = torch.Generator().manual_seed(bsz)
    xs = [torch.randn(bsz, dim, generator=g) for _ in range(len(freqs))]
    monkeypatch.setattr(launch, "ar_stack_config", _gpu_like)
    check_steps(xs, w, freqs, heads)
