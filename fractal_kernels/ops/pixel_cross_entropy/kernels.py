"""Fused pixel cross-entropy: the Triton row kernel ``_ce_rows_kernel`` (per-row loss, and the logits buffer
turned into ``(softmax - onehot) * scale`` in place). Defined only when triton is installed (``HAS_TRITON``).
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _ce_rows_kernel(logits_ptr, target_ptr, loss_ptr, scale_ptr, M, V, stride, ignore_index,
                        WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        # logits [M, V] fp32 -> loss [M]; with WRITE_GRAD the buffer becomes (softmax - onehot) * scale
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_V)
        rmask = rows < M
        m2 = rmask[:, None] & (cols < V)[None, :]
        ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :]
        x = tl.load(ptrs, mask=m2, other=float("-inf"))
        t = tl.load(target_ptr + rows, mask=rmask, other=ignore_index)
        valid = (t != ignore_index) & rmask
        bad = valid & ((t < 0) | (t >= V))  # out-of-range target: a NaN row, found without a host read
        mx = tl.max(x, axis=1)
        mx = tl.where(rmask, mx, 0.0)
        e = tl.where(m2, tl.exp(x - mx[:, None]), 0.0)
        s = tl.sum(e, axis=1)
        s = tl.where(rmask, s, 1.0)
        lse = mx + tl.log(s)
        hit = cols[None, :] == t[:, None]
        x_t = tl.sum(tl.where(hit & m2, x, 0.0), axis=1)
        tl.store(loss_ptr + rows, tl.where(valid, tl.where(bad, float("nan"), lse - x_t), 0.0), mask=rmask)
        if WRITE_GRAD:
            g = e / s[:, None] - tl.where(hit, 1.0, 0.0)
            if ROW_SCALE:
                g = g * tl.load(scale_ptr + rows, mask=rmask, other=0.0)[:, None]
            g = tl.where(valid[:, None], tl.where(bad[:, None], float("nan"), g), 0.0)
            tl.store(ptrs, g, mask=m2)

