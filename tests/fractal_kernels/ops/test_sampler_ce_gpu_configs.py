"""sample_logits' and the pixel cross-entropy's row kernels under the launch configurations a GPU runs (issue #27,
item 1).

In the interpreter both launchers give a program 131072 logits (512 rows of 256: every test's rows in one
program); a GPU gives it 2048 (8 rows of 256, one of 4096). Here the config functions are made to answer as
for sm_90 and sm_80 (``interpret=False``; both arches take the same blocks) and every case of
``benchmarks.aot``'s sampler / cross-entropy lists runs on 19 rows (3 programs, the last partial; V=4096: 3
one-row programs) against the references: ids equal to the torch backend's (the reference with the same
Philox uniforms; fixed seeds, so equality is deterministic), probabilities within 1e-6
(``test_sample_logits.py``), losses and gradients vs fp64 (``test_pixel_cross_entropy.py``).
:func:`test_every_aot_configuration_is_exercised` compares the code paths with the AOT capture.
"""
from __future__ import annotations

import pytest
import torch

import fractal_kernels.ops.pixel_cross_entropy as ce_mod
import fractal_kernels.ops.sample_logits as sl_mod
from fractal_kernels import pixel_cross_entropy, pixel_log_probs, sample_logits
from fractal_kernels.reference.cross_entropy import pixel_cross_entropy_reference

from tests.fractal_kernels import gpu_configs

ROWS = 19
SEED = 0x1234_5678_9ABC_DEF0
# (V, guided, cfg per row + probs, top_p, top_k, uniforms, greedy, dtype): the AOT sampler cases
F32, BF16 = torch.float32, torch.bfloat16
SAMPLER = [(256, True, False, 1.0, 0, False, False, F32), (256, True, True, 1.0, 0, False, False, F32),
           (256, True, False, 0.9, 32, False, False, F32), (256, False, False, 1.0, 0, True, False, BF16),
           (256, True, False, 1.0, 0, False, True, F32), (4096, True, False, 0.9, 32, False, False, F32)]
CE = ["train", "nll", "none"]  # the AOT cross-entropy cases: training (grad), eval (no grad), row-scaled backward


def _gpu(monkeypatch, module, name, arch):
    """Make ``module.name`` (a config function) answer with the GPU configuration for ``arch``."""
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda v, device, **kw: fn(v, device, arch=arch, interpret=False))


def _sampler_paths(case):
    V, guided, per_row, top_p, top_k, uni, greedy, dt = case
    return {gpu_configs.code_path("_sample_logits_kernel", str(dt)[6:], dict(
        HAS_UNCOND=guided, CFG_PER_ROW=per_row, HAS_UNIFORMS=uni, WRITE_PROBS=per_row, DO_TOP_K=0 < top_k < V,
        DO_TOP_P=top_p < 1.0, GREEDY=greedy, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v))
        for cfg in (sl_mod.launch.sample_logits_config(V, torch.device("cpu"), arch=a, interpret=False)
                    for a in gpu_configs.ARCHS)}


def _ce_paths(kind):
    return {gpu_configs.code_path("_ce_rows_kernel", "float32", dict(
        WRITE_GRAD=kind != "nll", ROW_SCALE=kind == "none", BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v))
        for cfg in (ce_mod.launch.ce_rows_config(256, torch.device("cpu"), arch=a, interpret=False)
                    for a in gpu_configs.ARCHS)}


def _sampler_id(c):
    V, guided, per_row, top_p, top_k, uni, greedy, dt = c
    return (f"V{V}-{'guided' if guided else 'unguided'}{'-per_row' if per_row else ''}-top_p{top_p}-top_k{top_k}"
            f"{'-uniforms' if uni else ''}{'-greedy' if greedy else ''}-{str(dt)[6:]}")


@pytest.mark.parametrize("case", SAMPLER, ids=_sampler_id)
def test_sample_logits_gpu_configs(case, monkeypatch, kernel_device):
    # sm_80 and sm_90 take one configuration today: one run covers both (asserted)
    cfgs = {sl_mod.launch.sample_logits_config(case[0], torch.device("cpu"), arch=a, interpret=False)
            for a in gpu_configs.ARCHS}
    assert len(cfgs) == 1
    arch = gpu_configs.ARCHS[0]
    V, guided, per_row, top_p, top_k, uni, greedy, dt = case
    n = ROWS if V <= 256 else 3
    _gpu(monkeypatch, sl_mod.launch, "sample_logits_config", arch)
    g = torch.Generator().manual_seed(V)
    cond = (torch.randn(n, V, generator=g) * 3).to(dt).to(kernel_device)
    unc = (torch.randn(n, V, generator=g) * 3).to(dt).to(kernel_device) if guided else None
    cfg = torch.linspace(1.0, 4.0, n).to(kernel_device) if per_row else (3.0 if guided else 1.0)
    u = torch.rand(n, generator=g, dtype=torch.float64).to(kernel_device) if uni else None
    kw = dict(cfg=cfg, temperature=0.0 if greedy else 1.0, filter_threshold=1e-4, top_p=top_p, top_k=top_k,
              uniforms=u, seed=SEED)
    probs = torch.empty(n, V, device=kernel_device) if per_row else None
    with gpu_configs.recording(sl_mod.kernels._sample_logits_kernel) as seen:
        ids = sample_logits(cond, unc, out_probs=probs, backend="triton", **kw)
    assert len(seen) == 1 and seen[0]["grid"][0] == -(-n // seen[0]["kwargs"]["BLOCK_N"]) >= 3
    assert gpu_configs.launched_path("_sample_logits_kernel", seen[0]) in _sampler_paths(case)
    ref_probs = torch.empty(n, V) if per_row else None
    ref = sample_logits(cond.cpu(), unc.cpu() if guided else None, out_probs=ref_probs, backend="torch",
                        **{**kw, "cfg": cfg.cpu() if per_row else cfg, "uniforms": u.cpu() if uni else None})
    assert torch.equal(ids.cpu(), ref)
    if per_row:
        torch.testing.assert_close(probs.cpu(), ref_probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", CE)
def test_ce_rows_gpu_configs(kind, monkeypatch, kernel_device):
    cfgs = {ce_mod.launch.ce_rows_config(256, torch.device("cpu"), arch=a, interpret=False)
            for a in gpu_configs.ARCHS}
    assert len(cfgs) == 1  # sm_80 and sm_90 take one configuration: one run covers both
    _gpu(monkeypatch, ce_mod.launch, "ce_rows_config", gpu_configs.ARCHS[0])
    g = torch.Generator().manual_seed(len(kind))
    x, w, b = torch.randn(ROWS, 16, generator=g), torch.randn(256, 16, generator=g) * 0.2, torch.randn(256, generator=g)
    t = torch.randint(0, 256, (ROWS,), generator=g)
    xs, ws, bs = (p.to(kernel_device).requires_grad_(kind != "nll") for p in (x, w, b))
    with gpu_configs.recording(ce_mod.kernels._ce_rows_kernel) as seen:
        if kind == "nll":
            out = pixel_log_probs(xs, ws, bs, t.to(kernel_device), backend="triton")
            ref = -pixel_cross_entropy_reference(x.double(), w.double(), b.double(), t, "none")
        else:
            out = pixel_cross_entropy(xs, ws, bs, t.to(kernel_device), reduction="mean" if kind == "train" else "none",
                                      backend="triton")
            xd, wd, bd = (p.double().requires_grad_() for p in (x, w, b))
            ref = pixel_cross_entropy_reference(xd, wd, bd, t, "mean" if kind == "train" else "none")
            go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            got = torch.autograd.grad(out, (xs, ws, bs), go.float().to(kernel_device))
            for a, r in zip(got, torch.autograd.grad(ref, (xd, wd, bd), go)):
                torch.testing.assert_close(a.double().cpu(), r, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=2e-5, rtol=1e-4)
    assert seen and all(s["grid"][0] == -(-ROWS // 8) for s in seen)
    # the case's own launch (nll: the forward; train: the forward that writes the gradient; none: the row-scaled
    # backward) is among those made
    assert _ce_paths(kind) <= {gpu_configs.launched_path("_ce_rows_kernel", s) for s in seen}


def test_every_aot_configuration_is_exercised():
    sampler = set().union(*(_sampler_paths(c) for c in SAMPLER))
    assert not gpu_configs.missing("_sample_logits_kernel", sampler), gpu_configs.missing("_sample_logits_kernel",
                                                                                          sampler)
    ce = set().union(*(_ce_paths(k) for k in CE))
    assert not gpu_configs.missing("_ce_rows_kernel", ce), gpu_configs.missing("_ce_rows_kernel", ce)
