"""tiny_attention helpers at the edges random data does not reach (mutation survivors, issue #27 item 5).

``_cast`` to bf16 rounds to nearest even under the interpreter (whose own cast truncates); random values almost
never sit exactly halfway between two bf16 values, so the tie rule is checked here on values built to be ties.
"""
import pytest
import torch

from fractal_kernels.ops.tiny_attention.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fractal_kernels.ops.tiny_attention.kernels import _cast

    @triton.jit
    def _cast_bf16_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, _cast(tl.load(x_ptr + offs), tl.bfloat16))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cast_to_bf16_rounds_ties_to_even():
    ulp = 2.0 ** -7  # bf16's spacing in [1, 2)
    ties = [1 + k * ulp + ulp / 2 for k in range(8)]  # halfway: even k rounds down, odd k up
    near = [1 + ulp / 2 + 2.0 ** -20, 1 + ulp / 2 - 2.0 ** -20, 1 + 2.0 ** -20]
    vals = ties + [-t for t in ties] + [t * 2.0 ** 40 for t in ties] + near
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(vals, dtype=torch.float32), torch.randn(64 - len(vals), generator=g)])
    y = torch.empty(64, dtype=torch.bfloat16)
    _cast_bf16_kernel[(1,)](x, y, BLOCK=64)
    assert torch.equal(y, x.to(torch.bfloat16))  # PyTorch's cast rounds to nearest even
    # the oracle itself: the ties go to the even neighbour, down for even k and up for odd k
    even = torch.tensor([1 + (k + k % 2) * ulp for k in range(8)], dtype=torch.float64)
    assert torch.equal(x[:8].to(torch.bfloat16).double(), even)
