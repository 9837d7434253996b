"""tiny_attention's kernels under the sm_90 and the sm_80 launch configurations (issue #27, item 1).

The attention launcher has no interpreter-only configuration (``_attn_config`` picks per arch), so the other
interpreter tests run the sm_90 one (the CPU's default arch); sm_80 takes 32-row packed tiles (sm_90: 64) and,
for fp32, 16-row dk/dv blocks. Here every case of ``benchmarks.aot``'s attention and decode lists runs under
``target_arch(90)`` and ``target_arch(80)`` (once when both arches launch the same code paths), narrowed for
the interpreter: fewer sequences and heads (still more pairs than one packed program holds, the last program
partial), streaming lengths 261 / 257 -> 97 (> 64: the streaming kernels; 2-4 query and key blocks, the last
partial), decode caches of 97 with 90 valid keys. Forward and backward (dq, dk, dv) against the fp64
references with ``test_tiny_attention.py``'s tolerances. :func:`test_every_aot_configuration_is_exercised`
compares the launched code paths (``tests/fractal_kernels/gpu_configs.py``) with the AOT capture's.

Not run here: 16-bit tensor-core dots (``DOT_F32=False``; the interpreter's bf16 ``tl.dot`` is wrong, so
interpreted launches upcast: ``DOT_F32`` is not compared), warps, pipelining (``num_stages``).
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from fractal_kernels._target import target_arch
from fractal_kernels.ops import tiny_attention as ta
from fractal_kernels.reference.attention import (attention_decode_reference, attention_dropout_scale,
                                                 attention_reference)

from tests.fractal_kernels import gpu_configs
from tests.fractal_kernels.ops.test_tiny_attention import GRAD_TOL, TOL

KERNELS = ("_attn_fwd_kernel", "_attn_bwd_packed_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SEED = 1234

# (entry, N, H, L, D, dtype, causal, dropout p): "packed" tiny_attention_packed (MAR levels, pixel head), "full"
# tiny_attention causal (AR levels' full pass), "decode" tiny_attention_decode (L: the cache length; 90 or 8
# valid keys; "rope"/"plain" in place of causal)
CASES = [
    ("packed", 3, 1, 21, 64, F32, False, 0.0), ("packed", 3, 1, 21, 64, BF16, False, 0.0),
    ("packed", 3, 1, 21, 64, F16, False, 0.0), ("packed", 3, 1, 21, 64, BF16, False, 0.1),
    ("packed", 3, 1, 22, 80, F32, False, 0.0), ("packed", 3, 1, 22, 80, BF16, False, 0.0),
    ("packed", 9, 4, 4, 16, F32, True, 0.0), ("packed", 9, 4, 4, 16, BF16, True, 0.0),
    ("packed", 9, 4, 4, 32, F32, True, 0.0), ("packed", 9, 4, 4, 32, BF16, True, 0.0),
    ("packed", 1, 1, 97, 64, F32, False, 0.0), ("packed", 1, 1, 97, 64, BF16, False, 0.0),
    ("packed", 1, 1, 97, 64, BF16, False, 0.1), ("packed", 1, 1, 97, 80, F32, False, 0.0),
    ("packed", 1, 1, 97, 80, BF16, False, 0.0),
    ("full", 3, 1, 17, 64, F32, True, 0.0), ("full", 3, 1, 17, 64, BF16, True, 0.1),
    ("full", 1, 1, 97, 64, F32, True, 0.0), ("full", 1, 1, 97, 64, BF16, True, 0.1),
    ("decode", 2, 2, 97, 64, F32, "rope", 0.0), ("decode", 2, 2, 97, 64, BF16, "rope", 0.0),
    ("decode", 3, 1, 17, 64, F32, "rope", 0.0), ("decode", 3, 1, 17, 64, BF16, "rope", 0.0),
    ("decode", 3, 1, 17, 64, F32, "plain", 0.0),
]


def _id(c):
    entry, n, h, L, d, dt, causal, p = c
    extra = causal if isinstance(causal, str) else ("causal" if causal else "")
    return f"{entry}-N{n}-H{h}-L{L}-D{d}-{str(dt)[6:]}{'-' + extra if extra else ''}{f'-p{p}' if p else ''}"


def _inputs(case, device):
    entry, n, h, L, d, dt, causal, p = case
    g = torch.Generator().manual_seed(L * d + n)
    r = lambda *s: torch.randn(*s, generator=g).to(dt).to(device)  # noqa: E731
    if entry == "packed":
        return (r(n, L, 3 * h * d).requires_grad_(),)
    if entry == "full":
        return tuple(r(n, h, L, d).requires_grad_() for _ in range(3))
    from fractal_models.ar import precompute_freqs_cis_2d
    freqs = precompute_freqs_cis_2d(10, d)[:L].to(device) if causal == "rope" else None
    return r(n, h, 1, d), r(n, h, L, d), r(n, h, L, d), freqs


def _call(case, inputs):
    entry, n, h, L, d, dt, causal, p = case
    if entry == "packed":
        return ta.tiny_attention_packed(inputs[0], h, causal=causal, dropout_p=p, dropout_seed=SEED,
                                        backend="triton")
    if entry == "full":
        return ta.tiny_attention(*inputs, causal=True, dropout_p=p, dropout_seed=SEED, backend="triton")
    q, kc, vc, freqs = inputs
    return ta.tiny_attention_decode(q, kc, vc, L - 7 if L > 64 else L // 2, freqs_cis=freqs, backend="triton")


def _reference(case, inputs, out, go):
    """(fp64 reference output, its gradients w.r.t. the inputs that require them, the kernel's gradients)."""
    entry, n, h, L, d, dt, causal, p = case
    if entry == "decode":
        # fp32: the fp64 reference; 16-bit: the reference on the 16-bit inputs (it rotates q, k and rounds them to
        # their dtype, as the kernel does; fp32 scores)
        q, kc, vc, freqs = inputs
        up = (lambda t: t.double()) if dt == F32 else (lambda t: t)  # noqa: E731
        lens = torch.full((n,), L - 7 if L > 64 else L // 2, device=q.device)
        return attention_decode_reference(up(q), up(kc), up(vc), lens, freqs_cis=freqs).double(), (), ()
    xs = [t.detach().double().requires_grad_() for t in inputs]
    if entry == "packed":
        q, k, v = xs[0].view(n, L, 3, h, d).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = xs
    keep = attention_dropout_scale(SEED, n, h, L, L, p, q.device).double() if p else None
    ref = attention_reference(q, k, v, causal=bool(causal), dropout_scale=keep)
    if entry == "packed":
        ref = ref.transpose(1, 2).reshape(n, L, h * d)
    want = torch.autograd.grad(ref, xs, go)
    got = torch.autograd.grad(out, inputs, go.to(dt))
    return ref, want, got


@contextlib.contextmanager
def _kernels_recorded(run: bool):
    """Record the four attention kernels' launches; ``run=False``: record only (a dry run: outputs garbage)."""
    seen, saved = [], {}
    for name in KERNELS:
        k = getattr(ta, name)
        saved[name] = k.run

        def rec(*args, grid, warmup, _k=k, _name=name, **kwargs):
            seen.append((_name, gpu_configs.Launch(grid=grid, kwargs=dict(kwargs),
                                                   args=dict(zip(_k.arg_names, args)))))
            return saved[_name](*args, grid=grid, warmup=warmup, **kwargs) if run else None
        k.run = rec
    try:
        yield seen
    finally:
        for name in KERNELS:
            del getattr(ta, name).run


def _paths(seen):
    return {(name, gpu_configs.launched_path(name, launch)) for name, launch in seen}


@functools.lru_cache(maxsize=None)
def dry_paths(case, arch):
    """The code paths ``case`` launches under ``target_arch(arch)`` (a dry run: nothing executes)."""
    with torch.no_grad() if case[0] == "decode" else contextlib.nullcontext():
        inputs = _inputs(case, torch.device("cpu"))
        with target_arch(arch), _kernels_recorded(run=False) as seen:
            out = _call(case, inputs)
            if case[0] != "decode":
                torch.autograd.grad(out, inputs, torch.zeros_like(out))
    return frozenset(_paths(seen))


def _arches(case):
    """The arches whose code paths ``case`` must run: sm_90, and sm_80 where it launches other ones."""
    return [90] + ([80] if dry_paths(case, 80) != dry_paths(case, 90) else [])


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_attention_gpu_configs(case, kernel_device):
    entry, n, h, L, d, dt, causal, p = case
    for arch in _arches(case):
        inputs = _inputs(case, kernel_device)
        with target_arch(arch), _kernels_recorded(run=True) as seen:
            out = _call(case, inputs)
            go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            ref, want, got = _reference(case, inputs, out, go.to(kernel_device))
        assert _paths(seen) == dry_paths(case, arch), f"sm_{arch}: launched other code paths than the dry run"
        torch.testing.assert_close(out.double(), ref.to(out.device), **TOL[dt], msg=lambda m: f"sm_{arch}: {m}")
        for a, r in zip(got, want):
            torch.testing.assert_close(a.double(), r, **GRAD_TOL[dt], msg=lambda m: f"sm_{arch} grad: {m}")


def test_every_aot_configuration_is_exercised():
    """Every (sm_90, sm_80) attention launch of the AOT capture list has its code path among the cases'."""
    exercised = set().union(*(dry_paths(c, a) for c in CASES for a in _arches(c)))
    for name in KERNELS:
        mine = {p for k, p in exercised if k == name}
        assert not gpu_configs.missing(name, mine), gpu_configs.missing(name, mine)
