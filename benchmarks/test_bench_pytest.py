"""pytest-benchmark entry point: the ``fractal-bench`` cases as ``benchmark``-fixture tests.

    python -m pytest benchmarks/test_bench_pytest.py --benchmark-only            # time them
    python -m pytest benchmarks/test_bench_pytest.py --benchmark-disable         # run each once (CI)
    python -m pytest benchmarks/test_bench_pytest.py --benchmark-only --benchmark-json=out.json

Cases: the fused pixel sampler (CFG off/on), the fused logits + cross-entropy (forward+backward), attention
forward and forward+backward at every WORKLOADS shape (``benchmarks.attention.SHAPES``) for the dispatched
``tiny_attention``, ``tiny_attention_packed``, PyTorch SDPA and the reference, and end-to-end ``generate`` on
``tiny_mar``. Small CPU shapes (fp32); on a CUDA machine GPU shapes (bf16 attention) and the dispatched
(Triton/CUDA) kernels. Every test asserts its output agrees with the reference computed in the same test.
Not collected by the plain test run (``testpaths = ["tests"]``); ``tests/test_bench_pytest_entry.py`` runs
it with ``--benchmark-disable`` so it cannot rot.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .attention import SHAPES, TOL, _chunk, _expected, _max_err
from fractal_kernels.ops.pixel_cross_entropy import pixel_cross_entropy
from fractal_kernels.ops.sample_logits import sample_logits
from fractal_kernels.ops.tiny_attention import tiny_attention, tiny_attention_packed
from fractal_kernels.reference.attention import attention_reference
from fractal_kernels.reference.cross_entropy import pixel_cross_entropy_reference
from fractal_kernels.reference.pixel_sampling import inverse_cdf_draw, pixel_probs_reference

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
V = 256


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


# ------------------------------------------------------------------------------------------ pixel sampler
@pytest.mark.parametrize("guided", [False, True], ids=["cfg1", "cfg3"])
def test_sampler(benchmark, guided):
    n = 100_000 if CUDA else 2_000
    dtype = torch.bfloat16 if CUDA else torch.float32
    cond = (torch.randn(n, V, generator=_gen(0), device=DEV) * 3).to(dtype)
    uncond = (torch.randn(n, V, generator=_gen(1), device=DEV) * 3).to(dtype)
    u = torch.rand(n, generator=_gen(2), device=DEV, dtype=torch.float64)
    cfg, t_ref, thr = (3.0 if guided else 1.0), 0.9, 1e-4
    benchmark.extra_info.update(N=n, V=V, cfg=cfg, dtype=str(dtype))
    ids = benchmark(lambda: sample_logits(cond, uncond if guided else None, cfg=cfg, temperature=1 / t_ref,
                                          filter_threshold=thr, uniforms=u))
    both = torch.cat([cond, uncond]) if guided else cond
    expected = inverse_cdf_draw(pixel_probs_reference(both, temperature=t_ref, cfg=cfg, filter_threshold=thr,
                                                      guided=guided), u)
    agree = float((ids == expected).float().mean())
    benchmark.extra_info["ids_agree"] = agree
    assert agree >= 0.999


# -------------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("c", [64, 128])
def test_cross_entropy_fwd_bwd(benchmark, c):
    n = 262_144 if CUDA else 4_096
    g = _gen(0)
    x = torch.randn(n, c, generator=g, device=DEV).requires_grad_()
    w = (torch.randn(V, c, generator=g, device=DEV) * 0.1).requires_grad_()
    b = torch.zeros(V, device=DEV).requires_grad_()
    t = torch.randint(0, V, (n,), generator=g, device=DEV)
    benchmark.extra_info.update(N=n, C=c, V=V)

    def step(fn):
        loss = fn(x, w, b, t)
        return (loss.detach(),) + torch.autograd.grad(loss, (x, w, b))
    got = benchmark(step, pixel_cross_entropy)
    exp = step(pixel_cross_entropy_reference)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- attention
def _attn_impl(name: str, causal: bool, scale: float, H: int):
    if name == "tiny_attention":
        return False, lambda q, k, v: tiny_attention(q, k, v, causal=causal, scale=scale)
    if name == "tiny_attention_packed":
        return True, lambda qkv: tiny_attention_packed(qkv, H, causal=causal, scale=scale)
    if name == "sdpa":
        return False, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return False, lambda q, k, v: attention_reference(q, k, v, causal=causal, scale=scale, scores_fp32=True)


@pytest.mark.parametrize("impl", ["tiny_attention", "tiny_attention_packed", "sdpa", "reference"])
@pytest.mark.parametrize("bwd", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.tag for s in SHAPES])
def test_attention(benchmark, shape, bwd, impl):
    L, H, D = shape.L, shape.H, shape.D
    n = (2 ** 13 if L <= 64 else 2 ** 8) if CUDA else (32 if L <= 64 else 2)
    dtype = torch.bfloat16 if CUDA else torch.float32
    acc = torch.float32 if CUDA else torch.float64
    scale = D ** -0.5
    g = _gen(L + n)
    qkv = torch.randn(n, L, 3, H, D, generator=g, device=DEV).to(dtype)
    packed_in = qkv.view(n, L, 3 * H * D).requires_grad_(bwd)
    q, k, v = (t.contiguous().requires_grad_(bwd) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    do = torch.randn(n, H, L, D, generator=g, device=DEV).to(dtype)
    packed, fn = _attn_impl(impl, shape.causal, scale, H)
    benchmark.extra_info.update(N=n, L=L, H=H, D=D, causal=shape.causal, dtype=str(dtype))

    def run():
        with torch.set_grad_enabled(bwd):
            if packed:
                o = fn(packed_in)
                outs = [o.reshape(n, L, H, D).transpose(1, 2)]
                if bwd:
                    (dqkv,) = torch.autograd.grad(o, (packed_in,), do.transpose(1, 2).reshape(o.shape))
                    outs += list(dqkv.view(n, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0))
                return outs
            o = fn(q, k, v)
            return [o] + (list(torch.autograd.grad(o, (q, k, v), do)) if bwd else [])
    got = benchmark(run)
    err = _max_err(got, _expected(q, k, v, do, shape, scale, bwd, acc), _chunk(shape, acc))
    benchmark.extra_info["max_err"] = err
    assert err <= TOL[dtype], f"max err {err:.2e} over tol {TOL[dtype]:.0e}"


# ------------------------------------------------------------------------------------------------- e2e
def _seeded_draw(seed: int):
    """A pixel draw from explicit uniforms, so the reference path and the fused sampler draw alike."""
    from fractal_models import uniform_draw
    g = torch.Generator(device=DEV).manual_seed(seed)
    return uniform_draw(lambda rows, channel: torch.rand(rows, generator=g, device=DEV, dtype=torch.float64))


def test_e2e_generate_tiny_mar(benchmark):
    from fractal_models import build_model, generate
    model = build_model("tiny_mar").to(DEV).eval()
    bsz = 8 if CUDA else 2
    labels = torch.arange(bsz, device=DEV) % model.num_classes
    kw = dict(num_iter_list=[2, 2], cfg=2.0, seed=0)
    benchmark.extra_info.update(config="tiny_mar", batch=bsz, **kw)
    imgs = benchmark.pedantic(lambda: generate(model, labels, backend="auto", draw=_seeded_draw(1), **kw),
                              rounds=3 if CUDA else 1, iterations=1)
    ref = generate(model, labels, backend="torch", draw=_seeded_draw(1), **kw)
    assert imgs.shape == ref.shape and imgs.dtype == torch.uint8
    same = float((imgs == ref).float().mean())
    benchmark.extra_info["pixels_equal_to_reference_path"] = same
    # CPU: "auto" runs the PyTorch paths, so with the same uniforms the images are identical. On a GPU the
    # kernels may flip a draw whose probabilities differ in the last bits (and a flipped patch conditions its
    # children differently), so there the bar is most sub-pixels equal.
    assert same == 1.0 if not CUDA else same >= 0.5
