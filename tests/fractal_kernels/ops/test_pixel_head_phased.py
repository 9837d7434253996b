"""The phased pixel head (``schedule="phases"``: ``_pixel_head_phased_kernel``, a launch per phase) against the
reference, under the interpreter's configuration and under the configurations a GPU runs (sm_90 / sm_80, every
code path the AOT gate compiles), plus its edges: NaN rows, empty batches, the value table, poisoned scratch,
the draws, dispatch and errors.

Tolerances as ``test_pixel_head.py``: ids exact (fp32 math, fixed uniforms; the logits agree to ~2e-6, a uniform
would have to land within ~1e-6 of a CDF boundary to flip an id), logits atol 1e-5 (fp32 weights; another
summation order) / 3e-5 (bf16 weights: the split-operand dot keeps fp32 accuracy). The persistent schedule
(``BARRIER=True``, grid barriers) is the same code between the barriers; it cannot run in the interpreter
(programs run one after another there, a barrier would wait forever): the GPU session's pixel-head phase checks
it against this one.
"""
from __future__ import annotations

import pytest
import torch

from fractal_kernels import _scratch, pixel_head_sample
from fractal_kernels.dispatch import last_backend
from fractal_kernels.ops.pixel_head import phased_kernels
from fractal_kernels.ops.pixel_head.phased import (PhasedConfig, launch_phased, phase_count, phase_items, phase_kind,
                                                   phased_config)
from fractal_kernels.reference.pixel_head import pack_pixel_head_weights, pixel_head_sample_reference

from tests.fractal_kernels import gpu_configs
from tests.fractal_kernels.ops.test_pixel_head import conds, head, unis

KERNEL = "_pixel_head_phased_kernel"
CPU = torch.device("cpu")


def _ref(cond, w, heads, guided, cfg, u, top_p=0.9):
    return pixel_head_sample_reference(cond, w, heads, guided=guided, cfg=cfg if guided else 1.0,
                                       inv_temperature=1.0, filter_threshold=1e-4, top_p=top_p, uniforms=u,
                                       return_logits=True)


# ---------------------------------------------------------------- the public op, schedule="phases"

CASES = [dict(guided=False), dict(guided=True, cfg=4.0, filter_threshold=1e-4, top_p=0.9),
         dict(guided=True, cfg="rows", temperature=1 / 1.3)]


@pytest.mark.parametrize("config", [(16, 1, 2), (64, 2, 4)])
@pytest.mark.parametrize("bsz", [1, 6, 17])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_phases_match_torch(case, bsz, config):
    kw = dict(CASES[case])
    if kw.get("cfg") == "rows":
        kw["cfg"] = torch.linspace(1.0, 5.0, bsz)
    w = pack_pixel_head_weights(head(*config))
    cond, u = conds(bsz, kw["guided"]), unis(bsz)
    ref = pixel_head_sample(cond, w, config[2], uniforms=u, backend="torch", **kw)
    out = pixel_head_sample(cond, w, config[2], uniforms=u, backend="triton", schedule="phases", **kw)
    assert last_backend("pixel_head_sample") == "triton" and last_backend("pixel_head_schedule") == "phases"
    assert out.dtype == torch.int64 and torch.equal(out, ref)


def test_phase_table():
    """The host's phase decoding (grid sizes) is the kernel's: EMB, then per channel 4 phases a block, LOGITS,
    SAMPLE; item counts per kind."""
    K = phased_kernels
    depth = 2
    kinds = [phase_kind(p, depth) for p in range(phase_count(depth))]
    assert phase_count(depth) == 31 and kinds[0] == (K.EMB, 0, 0)
    assert kinds[1:11] == [(K.QKV, 0, 0), (K.PROJ, 0, 0), (K.FC1, 0, 0), (K.FC2, 0, 0), (K.QKV, 0, 1),
                           (K.PROJ, 0, 1), (K.FC1, 0, 1), (K.FC2, 0, 1), (K.LOGITS, 0, 0), (K.SAMPLE, 0, 0)]
    assert kinds[-1] == (K.SAMPLE, 2, 0) and kinds[11] == (K.QKV, 1, 0)
    cfg = PhasedConfig(br=2, bn=2, kc=128, kcq=64, bp=8, dot=0, dotq=0, maxnreg=None, num_warps=4, max_programs=132)
    # fractalar_in64's head at batch 1: 2 rows; QKV a program per head, the 512-wide MLP 256 programs
    assert [phase_items(k, cfg, 128, 4, 512, 2, 1) for k in range(7)] == [64, 4, 64, 256, 64, 128, 1]


# ---------------------------------------------------------------- the GPU's configurations

# (width, heads, depth, condition width, pixels, guided, weight dtype): each is the code path of an AOT case
# (tests/fractal_kernels/gpu_configs.py CODE_PATH): 2-row tiles of the 64x64 models' head at batch 1 (W=128, a
# 2-trip condition projection), 16-row dot tiles of batch 8 (W=64 keeps sm_90's chunks; 24 rows: 2 row tiles, the
# second partial), its bf16 weights, the 256^2 models' last level (8 rows), the smallest head unguided
GPU_CASES = [(128, 4, 1, 256, 1, True, torch.float32), (64, 2, 1, 128, 12, True, torch.float32),
             (64, 2, 1, 128, 12, True, torch.bfloat16), (64, 4, 1, 256, 4, True, torch.float32),
             (16, 2, 1, 32, 1, False, torch.float32)]


def _id(c):
    W, H, depth, c_in, bsz, guided, dt = c
    return f"W{W}-H{H}-C{c_in}-b{bsz}-{'guided' if guided else 'unguided'}-{str(dt)[6:]}"


def _path(cfg, guided, dt, barrier=False):
    return gpu_configs.code_path(KERNEL, str(dt)[6:], dict(GUIDED=guided, BR=cfg.br, BN=cfg.bn, KC=cfg.kc,
                                                          KCQ=cfg.kcq, BP=cfg.bp, BARRIER=barrier))


def _configs(W, H, bsz, guided, dt):
    rows = 2 * bsz if guided else bsz
    return gpu_configs.by_path(phased_config, lambda cfg: _path(cfg, guided, dt), W, H, rows)


@pytest.mark.parametrize("case", GPU_CASES, ids=_id)
def test_phased_gpu_configs(case, kernel_device):
    W, H, depth, c_in, bsz, guided, dt = case
    w = pack_pixel_head_weights(head(W, depth, H, seed=W + depth, c_in=c_in), dt)
    g = torch.Generator().manual_seed(W)
    cond = torch.randn(2 * bsz if guided else bsz, c_in, generator=g)
    u = torch.rand(3, bsz, generator=g, dtype=torch.float64)
    cfg_t = torch.linspace(1.0, 4.0, bsz) if guided else None
    ref_ids, ref_logits = _ref(cond, w, H, guided, cfg_t, u)
    dev = kernel_device
    wd = type(w)(*(t.to(dev) for t in w))
    for path, ((arch, cfg), *_) in _configs(W, H, bsz, guided, dt).items():
        assert c_in >= 2 * cfg.kc or not cfg.dot  # the condition projection's K loop runs >= 2 trips
        ids = torch.full((bsz, 3), -7, dtype=torch.int64, device=dev)
        logits = torch.full((3, cond.shape[0], 256), float("nan"), device=dev)
        with gpu_configs.recording(phased_kernels._pixel_head_phased_kernel) as seen:
            grids = launch_phased(cond.to(dev), wd, H, guided, cfg_t.to(dev) if guided else None, 1.0, 1.0, 1e-4,
                                  0.9, False, u.to(dev), 0, 0, 0, ids, logits=logits, config=cfg, max_programs=3)
        assert len(seen) == phase_count(depth) and max(grids) == 3, f"sm_{arch}: {grids}"
        for launch in seen:
            gpu_configs.check_gpu_options(launch, cfg)
            assert gpu_configs.launched_path(KERNEL, launch) == path
        torch.testing.assert_close(logits.cpu(), ref_logits, atol=1e-5 if dt == torch.float32 else 3e-5, rtol=0)
        assert torch.equal(ids.cpu(), ref_ids)


def test_every_aot_configuration_is_exercised():
    """Every phased AOT launch's code path is a case above, but the persistent one (``BARRIER=True``: GPU only,
    the GPU session checks it against the phases)."""
    paths = {p for W, H, _, _, bsz, guided, dt in GPU_CASES for p in _configs(W, H, bsz, guided, dt)}
    missing = gpu_configs.missing(KERNEL, paths)
    barrier = [m for m in missing if "('BARRIER', True)" in m]
    assert barrier and sorted(missing) == sorted(barrier), missing


# ---------------------------------------------------------------- edges, draws, scratch, dispatch

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on the NaN row's math
def test_nan_rows_value_table_and_empty_batch():
    m = head(32, 2, 2)
    w = pack_pixel_head_weights(m)
    bsz = 6
    cond, u = conds(bsz, True), unis(bsz)
    kw = dict(cfg=2.0, filter_threshold=1e-4, uniforms=u, backend="triton", schedule="phases")
    clean = pixel_head_sample(cond, w, 2, **kw)
    bad = cond.clone()
    bad[1] = float("nan")           # pixel 1's conditional row
    bad[bsz + 4, 3] = float("nan")  # pixel 4's unconditional row
    out = pixel_head_sample(bad, w, 2, **kw)
    assert (out[[1, 4]] == -1).all() and torch.equal(out[[0, 2, 3, 5]], clean[[0, 2, 3, 5]])
    table = torch.randn(3, 257, generator=torch.Generator().manual_seed(3))
    vals = pixel_head_sample(bad, w, 2, value_table=table, **kw)
    assert torch.equal(vals, table[torch.arange(3).view(1, 3), out])
    empty = pixel_head_sample(cond[:0], w, 2, cfg=2.0, uniforms=u[:, :0], backend="triton", schedule="phases")
    assert empty.shape == (0, 3)


def test_draws_agree_with_the_tile_kernel():
    """Philox from a seed, greedy, and the exponential race: the same ids as the tile kernel and the torch
    backend (the same draws of the same logits)."""
    m = head(32, 2, 2)
    w = pack_pixel_head_weights(m)
    bsz = 9
    cond = conds(bsz, True)
    exps = torch.empty(3, bsz, 256).exponential_(generator=torch.Generator().manual_seed(4))
    for kw in (dict(seed=1234, offset=7), dict(temperature=0.0), dict(exponentials=exps)):
        a = pixel_head_sample(cond, w, 2, cfg=3.0, backend="triton", schedule="phases", **kw)
        b = pixel_head_sample(cond, w, 2, cfg=3.0, backend="triton", schedule="tiles", **kw)
        c = pixel_head_sample(cond, w, 2, cfg=3.0, backend="torch", **kw)
        assert torch.equal(a, b) and torch.equal(a, c), kw


@pytest.mark.parametrize("cfg_name", ["default", "sm_90"])
def test_scratch_is_written_before_it_is_read(cfg_name):
    """Every scratch element starts as NaN: the ids and logits are finite and bitwise those of a clean launch."""
    m = head(64, 1, 4)
    w = pack_pixel_head_weights(m)
    bsz = 9
    cond, u = conds(bsz, True), unis(bsz)
    cfg = None if cfg_name == "default" else phased_config(64, 4, 2 * bsz, CPU, arch=90, interpret=False)

    def run():
        ids = torch.empty(bsz, 3, dtype=torch.int64)
        logits = torch.empty(3, 2 * bsz, 256)
        launch_phased(cond, w, 4, True, None, 2.0, 1.0, 1e-4, 1.0, False, u, 0, 0, 0, ids, logits=logits,
                      config=cfg, max_programs=2)
        return ids, logits

    clean = run()
    with _scratch.poisoned():
        poisoned = run()
    for a, b in zip(clean, poisoned):
        assert torch.isfinite(b.float()).all() and torch.equal(a, b)


def test_schedule_errors_name_the_argument():
    w = pack_pixel_head_weights(head(16, 1, 2))
    cond, u = conds(3, False), unis(3)
    with pytest.raises(ValueError, match="schedule"):
        pixel_head_sample(cond, w, 2, uniforms=u, backend="triton", schedule="barrier")
    with pytest.raises(ValueError, match="schedule: 'persistent'.*CUDA"):
        pixel_head_sample(cond, w, 2, uniforms=u, backend="triton", schedule="persistent")
    with pytest.raises(ValueError, match="schedule: 'phases'.*backend 'torch'"):
        pixel_head_sample(cond, w, 2, uniforms=u, backend="torch", schedule="phases")
    # the default on a CPU (no GPU arch, no crossover data) is the tile kernel
    pixel_head_sample(cond, w, 2, uniforms=u, backend="triton")
    assert last_backend("pixel_head_schedule") == "tiles"


@pytest.mark.parametrize("bsz", [1, 9], ids=["2-row tiles", "16-row dot tiles"])
def test_a_hidden_width_no_tile_divides(bsz):
    """The op takes any MLP width (packed weights, not only PixelLoss's 4 W): 71 hidden units leave a partial
    column item in FC1 and a partial K chunk in FC2 under the sm_90 configuration, masked both ways."""
    m = head(32, 1, 2)
    w = pack_pixel_head_weights(m)
    hid = 71
    w = w._replace(fc1_w=w.fc1_w[:, :hid].contiguous(), fc1_b=w.fc1_b[:, :hid].contiguous(),
                   fc2_w=w.fc2_w[:, :, :hid].contiguous())
    cond, u = conds(bsz, True), unis(bsz)
    cfg = phased_config(32, 2, 2 * bsz, CPU, arch=90, interpret=False)
    assert hid % cfg.bn and (cfg.dot == 0 or hid % cfg.kc)
    ref_ids, ref_logits = _ref(cond, w, 2, True, 2.0, u)
    ids = torch.full((bsz, 3), -7, dtype=torch.int64)
    logits = torch.full((3, 2 * bsz, 256), float("nan"))
    launch_phased(cond, w, 2, True, None, 2.0, 1.0, 1e-4, 0.9, False, u, 0, 0, 0, ids, logits=logits, config=cfg,
                  max_programs=3)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(ids, ref_ids)


def test_16bit_weights_on_broadcast_tiles():
    """bf16 weights at batch 1 (2-row tiles: the broadcast products, DOT=0, not the split-operand dot): upcast on
    load, the same ids and logits as the reference on the same bf16 weights."""
    w = pack_pixel_head_weights(head(32, 1, 2), torch.bfloat16)
    cond, u = conds(1, True), unis(1)
    cfg = phased_config(32, 2, 2, CPU, arch=90, interpret=False)
    assert cfg.dot == 0
    ref_ids, ref_logits = _ref(cond, w, 2, True, 2.0, u)
    ids = torch.full((1, 3), -7, dtype=torch.int64)
    logits = torch.full((3, 2, 256), float("nan"))
    launch_phased(cond, w, 2, True, None, 2.0, 1.0, 1e-4, 0.9, False, u, 0, 0, 0, ids, logits=logits, config=cfg)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(ids, ref_ids)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on the NaN logits' math
def test_a_dead_channel_stays_dead_when_later_channels_are_finite():
    """Channel 0's logits all NaN (its bias): every pixel gets -1 there, and -1 for G and B too although their
    logits (from codebook row 0, the dead id's embedding) are finite: the op's contract, the reference's."""
    w = pack_pixel_head_weights(head(32, 1, 2))
    mlm_b = w.mlm_bias.clone()
    mlm_b[0] = float("nan")
    w = w._replace(mlm_bias=mlm_b)
    cond, u = conds(5, True), unis(5)
    want = pixel_head_sample(cond, w, 2, cfg=2.0, uniforms=u, backend="torch")
    got = pixel_head_sample(cond, w, 2, cfg=2.0, uniforms=u, backend="triton", schedule="phases")
    assert (want == -1).all() and torch.equal(got, want)
