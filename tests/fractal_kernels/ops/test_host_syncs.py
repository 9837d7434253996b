"""No host synchronisation on the ops' fast path: ``_check_lens`` (tiny_attention*) and ``pixel_cross_entropy``
validate device *values* only where that costs no sync (CPU tensors) or in debug mode
(``FRACTAL_KERNELS_DEBUG=1``). CUDA is simulated on CPU tensors by deferring the CPU's checks as CUDA's are; a
dispatch mode records every op that reads a tensor value on the host (``aten._local_scalar_dense``: ``.item()``,
``int()``, ``bool()``; ``nonzero``/``masked_select``: boolean indexing) and ``Tensor.tolist``."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fractal_kernels._checks as checks
from fractal_kernels import pixel_cross_entropy, tiny_attention, tiny_attention_decode, tiny_attention_packed

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "item", "is_nonzero"}


class SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def record(monkeypatch):
    def run(fn):
        rec = SyncRecorder()
        tolist = torch.Tensor.tolist

        def spy(self, *a, **k):
            rec.seen.append("tolist")
            return tolist(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, "tolist", spy)
        with rec:
            out = fn()
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        return out, rec.seen
    return run


@pytest.fixture
def like_cuda(monkeypatch):
    """CPU tensors treated as CUDA ones are: value checks deferred (unless debug mode)."""
    monkeypatch.setattr(checks, "DEFERRED_CHECK_DEVICES", frozenset({"cuda", "cpu"}))
    monkeypatch.delenv("FRACTAL_KERNELS_DEBUG", raising=False)


def _attn_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 16, generator=g) for _ in range(3))
    return q, k, v, torch.tensor([7, 3, 0])


def _ce_inputs():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(9, 16, generator=g), torch.randn(256, 16, generator=g) * 0.2, torch.randn(256, generator=g)
    return x, w, b, torch.randint(0, 256, (9,), generator=g)


def _calls():
    q, k, v, lens = _attn_inputs()
    x, w, b, t = _ce_inputs()
    qkv = torch.cat([q, k, v], dim=-1).transpose(1, 2).reshape(3, 7, -1)  # [N, L, 3*H*D] in any order
    return {
        "tiny_attention": lambda: tiny_attention(q, k, v, seqlens=lens, backend="triton"),
        "tiny_attention_packed": lambda: tiny_attention_packed(qkv, 2, seqlens=lens, backend="triton"),
        "tiny_attention_decode": lambda: tiny_attention_decode(q[:, :, :1], k, v, torch.tensor([7, 3, 1]),
                                                               backend="triton"),
        "pixel_cross_entropy[triton]": lambda: pixel_cross_entropy(x, w, b, t, backend="triton"),
        "pixel_cross_entropy[none]": lambda: pixel_cross_entropy(x, w, b, t, reduction="none", backend="triton"),
        "pixel_cross_entropy[torch]": lambda: pixel_cross_entropy(x, w, b, t, backend="torch"),
    }


@pytest.mark.parametrize("op", list(_calls()))
def test_no_host_sync_where_checks_are_deferred(op, record, like_cuda):
    _, seen = record(_calls()[op])
    assert seen == [], f"{op} read device values on the host: {seen}"


@pytest.mark.parametrize("op", [k for k in _calls() if k != "pixel_cross_entropy[torch]"])
def test_cpu_tensors_keep_their_checks(op, record):
    # the detector sees the checks where they still run (so the test above can fail)
    _, seen = record(_calls()[op])
    assert seen, op


def test_debug_mode_checks_on_deferred_devices(like_cuda, monkeypatch):
    monkeypatch.setenv("FRACTAL_KERNELS_DEBUG", "1")
    q, k, v, _ = _attn_inputs()
    with pytest.raises(ValueError, match=r"seqlens: values must lie in \[0, 7\]"):
        tiny_attention(q, k, v, seqlens=torch.tensor([8, 1, 1]), backend="triton")
    with pytest.raises(ValueError, match="kv_lens: every length must be >= Lq=2"):
        tiny_attention_decode(q[:, :, :2], k, v, torch.tensor([7, 1, 2]), backend="triton")
    x, w, b, t = _ce_inputs()
    t[2] = 256
    with pytest.raises(ValueError, match=r"target: values must be in \[0, 256\)"):
        pixel_cross_entropy(x, w, b, t, backend="triton")


def test_bad_values_without_checks_stay_safe_and_visible(like_cuda):
    q, k, v, _ = _attn_inputs()
    # lengths outside [0, L] act as clamped to it (the kernels never read past L)
    out = tiny_attention(q, k, v, seqlens=torch.tensor([9, -2, 3]), backend="triton")
    torch.testing.assert_close(out, tiny_attention(q, k, v, seqlens=torch.tensor([7, 0, 3]), backend="triton"),
                               rtol=0, atol=0)
    # an out-of-range target poisons its row (loss and gradient) instead of a finite wrong loss
    x, w, b, t = _ce_inputs()
    t[2], t[5] = 256, -3
    x.requires_grad_()
    rows = pixel_cross_entropy(x, w, b, t, reduction="none", backend="triton")
    bad = torch.zeros(9, dtype=torch.bool)
    bad[[2, 5]] = True
    assert torch.equal(rows.isnan(), bad)
    assert torch.isnan(pixel_cross_entropy(x, w, b, t, backend="triton"))
    (g,) = torch.autograd.grad(rows.nansum(), x)
    assert torch.equal(g.isnan().any(1), bad)
    t[5] = -100  # ignore_index stays ignored, not "bad"
    rows = pixel_cross_entropy(x, w, b, t, reduction="none", backend="triton")
    assert rows[5] == 0 and rows[2].isnan() and rows.isnan().sum() == 1
