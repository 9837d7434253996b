"""Hypothesis-driven shape fuzzing of tiny_attention (Triton) against the fp64 reference; tolerances as in
test_tiny_attention.py. Own file so a GPU image without hypothesis still runs the main grid."""
import pytest

hypothesis = pytest.importorskip("hypothesis")  # installed by the test extra (CI); optional on GPU images
from hypothesis import given, settings, strategies as st  # noqa: E402

from tests.fractal_kernels.ops.test_tiny_attention import check_fwd_bwd, qkv  # noqa: E402


@settings(max_examples=20, deadline=None, derandomize=True)
@given(n=st.integers(1, 9), h=st.integers(1, 4), length=st.integers(1, 80), d=st.sampled_from([16, 32, 64, 80]),
       causal=st.booleans(), contiguous=st.booleans())
def test_shape_fuzzing(n, h, length, d, causal, contiguous):
    q, k, v = qkv(n, h, length, d, seed=n * 7 + length)
    if not contiguous:
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    check_fwd_bwd(q, k, v, causal, grads=length <= 64)
