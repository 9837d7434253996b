"""The fused MAR stack under GPU-like chunking, on the interpreter (mutation survivors, issue #27 item 5).

The interpreter's launch configuration takes whole-width chunks and a grid of one program per sequence, so the
chunk loops run once and the persistent loop's sequence offset (``it * nprog``) never moves. Here the launcher
gets a GPU-like configuration instead: 16-column output and K chunks, 8-wide head-dim chunks (several of each),
and fewer programs than sequences. Shapes: D = 32 (every chunk divides: the unmasked EVEN path) and D = 40
(head dim 20: the masked path). fp32 weights against the fp64 reference, the module's fp32 tolerance.
"""
import pytest
import torch

from fractal_kernels.ops.mar_stack import launch, mar_block_stack, pack_mar_stack

from tests.fractal_kernels.ops.test_mar_stack import close_to_reference, make_stack


def _gpu_like(lp, max_programs):
    def config(width, hidden, head_dim, seq, wdtype, device):
        return launch.MarStackConfig(lp=max(lp, 16), nc=16, kc=16, dc=8, dot16=2, num_warps=4, maxnreg=None,
                                     max_programs=max_programs)
    return config


@pytest.mark.parametrize("D,H,wdtype", [(32, 2, torch.float32), (40, 2, torch.float32), (32, 2, torch.bfloat16)],
                         ids=["even", "masked", "even-bf16"])
def test_gpu_like_chunks_and_a_persistent_grid(monkeypatch, D, H, wdtype):
    blocks, norm = make_stack(D, H, 1, seed=D + 7)
    w = pack_mar_stack(blocks, norm, wdtype)
    # 3 sequences on 2 programs: program 0 runs sequences 0 and 2 (it = 1 moves by nprog)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(launch, "mar_stack_config", _gpu_like(16, 2))
    y = mar_block_stack(x, w, H, backend="triton")
    close_to_reference(y, x, w, H)
