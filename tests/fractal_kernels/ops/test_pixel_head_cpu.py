"""fractal_kernels.pixel_head_sample on the compiled CPU kernel (``backend="cpu"``, fractal_kernels/cpu) against
the torch backend, the public code's fixtures, and ``torch.multinomial``.

The raw-logits check against the reference (three tiles) is test_pixel_head.test_kernel_logits_and_several_programs.
Tolerances: logits atol 1e-5 against the reference (fp32, another summation order: measured ~1e-6); ids are
compared exactly over the grid (fixed seeds, so this is deterministic: an id flips only if a uniform or an
exponential race lands within ~1e-6 of a tie, which none of these inputs does). The exponential-race draw is
``torch.multinomial``'s own algorithm, checked bit for bit against ``torch.multinomial`` on the global RNG.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fractal_kernels import cpu, pixel_head_sample
from fractal_kernels.dispatch import BackendUnavailable, backend_report, last_backend
from fractal_kernels.ops.pixel_head import _launch_cpu
from fractal_kernels.reference.pixel_head import pack_pixel_head_weights
from fractal_models.pixelloss import PixelLoss

from .test_pixel_head import C, CONFIGS, SAMPLER_CASES, _kwargs, conds, head, unis

HAS_CXX = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
needs_cpu_kernel = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler on this machine")


def test_cpu_kernels_build_where_a_compiler_exists():
    ok, why = cpu.status()
    assert ok == HAS_CXX, why
    assert backend_report()["cpu"] == (ok, why)


@needs_cpu_kernel
@pytest.mark.parametrize("config", CONFIGS + [(24, 0, 3)])  # + a width no power of two, no blocks
@pytest.mark.parametrize("bsz", [1, 5, 17, 33])
@pytest.mark.parametrize("case", range(len(SAMPLER_CASES)))
def test_cpu_matches_torch_grid(case, bsz, config):
    kw = _kwargs(SAMPLER_CASES[case], bsz)
    m = head(*config) if config[0] != 24 else PixelLoss(c_channels=C, width=24, depth=0, num_heads=3).eval()
    w = pack_pixel_head_weights(m)
    cond = conds(bsz, kw["guided"])
    for draw in (dict(uniforms=unis(bsz)), dict(seed=7, offset=3),
                 dict(exponentials=torch.empty(3, bsz, 256).exponential_(generator=torch.Generator().manual_seed(4)))):
        ref = pixel_head_sample(cond, w, config[2], backend="torch", **draw, **kw)
        out = pixel_head_sample(cond, w, config[2], backend="cpu", **draw, **kw)
        assert last_backend("pixel_head_sample") == "cpu"
        assert out.shape == (bsz, 3) and out.dtype == torch.int64
        assert torch.equal(out, ref), draw.keys()


@needs_cpu_kernel
@pytest.mark.parametrize("name", ["tiny_mar", "tiny_ar"])
def test_cpu_logits_match_the_public_code_fixtures(name):
    """The fixtures' pixel heads: channel-0 (R) logits the public code computed from the condition alone, for
    every row (channels 1 and 2 are teacher-forced there, and covered against the reference above)."""
    from fractal_models import FractalGen
    from tests.conftest import load_fixture
    meta, data = load_fixture(name)
    model = FractalGen(**meta["constructor"], backend="torch").eval()
    model.load_state_dict(data["state_dict"], strict=True)
    pl = [m for m in model.modules() if isinstance(m, PixelLoss)][-1]
    cond = data["pixel.cond_list"][0]
    ids = torch.empty(cond.shape[0], 3, dtype=torch.int64)
    logits = torch.empty(3, cond.shape[0], 256)
    _launch_cpu(cond, pack_pixel_head_weights(pl), pl.blocks[0].attn.num_heads, False, None, 1.0, 1.0, 0.0, 1.0,
                True, None, 0, 0, 0, ids, logits=logits)
    torch.testing.assert_close(logits[0], data["pixel.logits"][:, 0], atol=1e-5, rtol=0)


def test_exponential_race_is_torch_multinomial():
    """argmax(p / e) with e = the Exp(1) noise torch.multinomial draws picks exactly torch.multinomial's ids, and
    leaves the global RNG where it leaves it (the model's CPU fused head relies on both)."""
    g = torch.Generator().manual_seed(0)
    for rows in (1, 8, 33):
        probs = torch.softmax(torch.randn(rows, 256, generator=g) * 3, dim=-1)
        torch.manual_seed(123)
        want = torch.multinomial(probs, 1).reshape(-1)
        after_want = torch.rand(3)
        torch.manual_seed(123)
        e = torch.empty(rows, 256).exponential_()
        got = (probs / e).argmax(dim=-1)
        assert torch.equal(got, want)
        assert torch.equal(torch.rand(3), after_want)
    # a [3, B, 256] buffer filled channel by channel draws the same numbers as three fresh tensors
    torch.manual_seed(5)
    fresh = [torch.empty(4, 256).exponential_() for _ in range(3)]
    torch.manual_seed(5)
    buf = torch.empty(3, 4, 256)
    for c in range(3):
        buf[c].exponential_()
    assert torch.equal(buf, torch.stack(fresh))


@needs_cpu_kernel
@pytest.mark.parametrize("guided", [False, True])
def test_cpu_empty_batch_and_nan_rows(guided):
    m = head(32, 2, 2)
    w = pack_pixel_head_weights(m)
    out = pixel_head_sample(torch.empty(0, C), w, 2, guided=guided, cfg=2.0 if guided else 1.0,
                            uniforms=torch.empty(3, 0), backend="cpu")
    assert out.shape == (0, 3)
    bsz = 6
    cond, u = conds(bsz, guided), unis(bsz)
    kw = dict(cfg=2.0 if guided else 1.0, filter_threshold=1e-4, uniforms=u)
    clean = pixel_head_sample(cond, w, 2, backend="cpu", **kw)
    bad = cond.clone()
    bad[1] = float("nan")
    if guided:
        bad[bsz + 4, 3] = float("nan")
    out = pixel_head_sample(bad, w, 2, backend="cpu", **kw)
    dead = [1, 4] if guided else [1]
    assert (out[dead] == -1).all()
    keep = [i for i in range(bsz) if i not in dead]
    assert torch.equal(out[keep], clean[keep])
    assert torch.equal(out, pixel_head_sample(bad, w, 2, backend="torch", **kw))


@needs_cpu_kernel
def test_cpu_greedy_bf16_weights_and_strided_cond():
    m = head(16, 1, 2)
    w16 = pack_pixel_head_weights(m, torch.bfloat16)
    cond = conds(9, True)
    ref = pixel_head_sample(cond, w16, 2, cfg=3.0, temperature=0.0, backend="torch")
    assert torch.equal(pixel_head_sample(cond, w16, 2, cfg=3.0, temperature=0.0, backend="cpu"), ref)
    wide = torch.randn(18, 2 * C)
    strided = wide[:, ::2]  # column stride 2: the launcher copies it
    u = unis(9)
    assert torch.equal(pixel_head_sample(strided, w16, 2, cfg=3.0, uniforms=u, backend="cpu"),
                       pixel_head_sample(strided.contiguous(), w16, 2, cfg=3.0, uniforms=u, backend="torch"))


@needs_cpu_kernel
def test_cpu_dispatch_and_errors():
    m = head(16, 1, 2)
    w = pack_pixel_head_weights(m)
    cond, u = conds(4, True), unis(4)
    pixel_head_sample(cond, w, 2, cfg=2.0, uniforms=u)  # auto on a CPU tensor
    assert last_backend("pixel_head_sample") == "cpu"
    with pytest.raises(ValueError, match="exponentials"):
        pixel_head_sample(cond, w, 2, cfg=2.0, exponentials=torch.rand(3, 4, 255))
    with pytest.raises(ValueError, match="exponentials"):
        pixel_head_sample(cond, w, 2, cfg=2.0, uniforms=u, exponentials=torch.rand(3, 4, 256))
    from fractal_kernels import sample_logits
    with pytest.raises(BackendUnavailable, match="sample_logits.*'cpu'"):
        sample_logits(torch.randn(2, 256), backend="cpu")


def test_without_the_cpu_kernels_auto_falls_back_and_cpu_says_why(tmp_path):
    """FRACTAL_KERNELS_CPU=0 (or no compiler): auto runs the torch backend, a forced "cpu" names the reason."""
    code = (
        "import torch\n"
        "from fractal_kernels import pixel_head_sample\n"
        "from fractal_kernels.dispatch import BackendUnavailable, last_backend\n"
        "from fractal_kernels.reference.pixel_head import pack_pixel_head_weights\n"
        "from fractal_models.pixelloss import PixelLoss\n"
        "w = pack_pixel_head_weights(PixelLoss(c_channels=8, width=16, depth=1, num_heads=2))\n"
        "pixel_head_sample(torch.randn(2, 8), w, 2, seed=1)\n"
        "assert last_backend('pixel_head_sample') == 'torch'\n"
        "try:\n"
        "    pixel_head_sample(torch.randn(2, 8), w, 2, seed=1, backend='cpu')\n"
        "except BackendUnavailable as e:\n"
        "    assert 'FRACTAL_KERNELS_CPU=0' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('forced cpu ran')\n"
    )
    env = dict(os.environ, FRACTAL_KERNELS_CPU="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_cpu_kernel
def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    """A fresh cache directory gets exactly one library file (no temporary left behind); a second load reuses it."""
    monkeypatch.setenv("FRACTAL_KERNELS_CACHE", str(tmp_path))
    path = cpu._build(cpu._compiler())
    assert os.path.dirname(path) == str(tmp_path) and os.listdir(tmp_path) == [os.path.basename(path)]
    mtime = os.path.getmtime(path)
    assert cpu._build(cpu._compiler()) == path and os.path.getmtime(path) == mtime


def test_a_failed_build_warns_once_and_auto_falls_back(monkeypatch):
    """No working compiler: one RuntimeWarning naming the reason, status() says why, auto runs torch."""
    monkeypatch.setattr(cpu, "_STATE", {})
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    monkeypatch.delenv("FRACTAL_KERNELS_CPU", raising=False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert cpu.library() is None
    assert cpu.status() == (False, "no C++ compiler found (set CXX, or install g++/clang++)")
    w = pack_pixel_head_weights(head(16, 1, 2))
    pixel_head_sample(conds(2, False), w, 2, seed=1)
    assert last_backend("pixel_head_sample") == "torch"
