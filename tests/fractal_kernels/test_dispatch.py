"""Dispatch: forced backends, graceful auto choice, visible decisions; per-shape support; per-call cost."""
import builtins
import importlib
import json
import sys
import types

import pytest
import torch

from fractal_kernels import _target, dispatch, policy
from fractal_kernels.dispatch import BackendUnavailable, last_backend, resolve, shape_class

CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def _isolated_policy(tmp_path, monkeypatch):
    """Each test reads the packaged policy plus an empty overlay of its own, with fresh dispatch caches."""
    monkeypatch.setenv("FRACTAL_HOME", str(tmp_path / "fractal_home"))
    dispatch.reload()
    yield
    dispatch.reload()  # lazily: the next call reads the unpatched world again


def _fake_gpu(monkeypatch, verified=(), ext_symbols=("sample_logits", "ce_rows", "tiny_attention_fwd"),
              crossover=None):
    """A CUDA device named "Fake GPU", a built extension with ``ext_symbols`` and ``verified`` ops in the overlay
    (nothing real runs: these tests only ask the dispatch)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(_target, "_OVERRIDE", 90)  # its arch (never asked of torch: no capability is cached)
    if ext_symbols is not None:
        ext = types.ModuleType("fractal_kernels._C")
        for name in ext_symbols:
            setattr(ext, name, lambda *a: None)
        monkeypatch.setitem(sys.modules, "fractal_kernels._C", ext)
    home = policy.home()
    if verified:
        policy.write_document(f"{home}/{policy.VERIFIED}", {"ops": sorted(verified), "runs": {}})
    if crossover is not None:
        policy.write_document(f"{home}/{policy.CROSSOVER}", {"Fake GPU": crossover})
    dispatch.reload()


def test_auto_on_cpu_is_torch_and_recorded(monkeypatch):
    monkeypatch.delenv("FRACTAL_KERNELS_BACKEND", raising=False)
    assert resolve("sample_logits", None, torch.device("cpu")) == "torch"
    assert last_backend("sample_logits") == "torch"


def test_environment_forces_a_backend(monkeypatch, capsys):
    monkeypatch.setenv("FRACTAL_KERNELS_BACKEND", "torch")
    monkeypatch.setenv("FRACTAL_KERNELS_VERBOSE", "1")
    assert resolve("pixel_cross_entropy", None, torch.device("cpu")) == "torch"
    assert "pixel_cross_entropy -> torch" in capsys.readouterr().err


def test_forced_unavailable_backends_say_why(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
            resolve("sample_logits", "cuda", torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
            resolve("sample_logits", "triton", torch.device("cpu"))


def test_auto_prefers_cuda_only_when_verified(monkeypatch):
    _fake_gpu(monkeypatch)
    assert resolve("sample_logits", "auto", CUDA) == "triton"
    _fake_gpu(monkeypatch, verified=("sample_logits", "pixel_cross_entropy"))
    assert dispatch.cuda_verified_ops() == ["pixel_cross_entropy", "sample_logits"]
    assert resolve("sample_logits", "auto", CUDA) == "cuda"
    assert resolve("pixel_cross_entropy", "auto", CUDA) == "cuda"
    assert resolve("tiny_attention", "auto", CUDA) == "triton"  # built, not verified
    monkeypatch.setattr(dispatch, "_triton", lambda: (False, "no triton"))
    policy.write_document(policy.overlay_path(policy.VERIFIED), {"ops": [], "runs": {"sample_logits": {}}})
    dispatch.reload()
    assert resolve("sample_logits", "auto", CUDA) == "torch"  # the overlay withdrew it, no triton


def test_overlay_decides_the_ops_it_mentions_over_the_package(monkeypatch, tmp_path):
    """Package data lists what a release verified; the overlay (a GPU run here) adds ops and withdraws failed
    ones; every decision names its file. The benchmark's promote step merges exactly the same way."""
    pkg = tmp_path / "pkg"
    monkeypatch.setattr(policy, "PACKAGE_DIR", str(pkg))
    policy.write_document(policy.package_path(policy.VERIFIED), {"ops": ["sample_logits", "tiny_attention"]})
    policy.write_document(policy.package_path(policy.CROSSOVER), {"A": {"bfloat16": {"64": 256}},
                                                                  "B": {"bfloat16": {"64": 128}}})
    overlay = {"ops": ["pixel_cross_entropy"], "runs": {"tiny_attention": {"passed": False},
                                                        "pixel_cross_entropy": {"passed": True}}}
    policy.write_document(policy.overlay_path(policy.VERIFIED), overlay)
    policy.write_document(policy.overlay_path(policy.CROSSOVER), {"B": {"bfloat16": {"64": 96}}})
    p = policy.reload()
    assert p.verified == {"sample_logits", "pixel_cross_entropy"}
    assert p.verified_source["sample_logits"] == policy.package_path(policy.VERIFIED)
    assert p.verified_source["tiny_attention"] == policy.overlay_path(policy.VERIFIED)
    assert p.crossover_length("A", "bfloat16", 64) == 256 and p.crossover_length("B", "bfloat16", 64) == 96
    assert p.crossover_length("B", "float16", 64) is None
    assert p.crossover_source == {"A": policy.package_path(policy.CROSSOVER), "B": policy.overlay_path(policy.CROSSOVER)}
    assert set(policy.merge_verified(policy.read_document(policy.package_path(policy.VERIFIED))[0], overlay)["ops"]) \
        == p.verified
    text = "\n".join(policy.describe("B", ("sample_logits", "tiny_attention")))
    assert f"cuda tiny_attention: not verified (from {policy.overlay_path(policy.VERIFIED)})" in text
    assert "'B' [this device]: bfloat16 D=64: L>=96" in text


def test_unreadable_policy_file_warns_and_counts_as_absent(monkeypatch):
    path = policy.overlay_path(policy.VERIFIED)
    policy.write_document(path, {})
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.warns(RuntimeWarning, match="cuda_verified.json is unreadable"):
        p = policy.reload()
    packaged = set(policy.read_document(policy.package_path(policy.VERIFIED))[0]["ops"])
    assert p.verified == packaged and (path, "read") not in p.files


# --------------------------------------------------------------- issue 15 item 7: per-shape support, fall through
def test_auto_falls_through_where_the_cuda_bindings_reject_the_shape(monkeypatch):
    """Verified ops still go to Triton for calls the CUDA kernels cannot take (sampler / cross-entropy V > 1024,
    attention D outside {16, 32, 64, 80, 128}, attention dropout, a dtype the binding rejects)."""
    _fake_gpu(monkeypatch, verified=("sample_logits", "pixel_cross_entropy", "tiny_attention"))
    f32 = torch.float32
    assert resolve("sample_logits", None, CUDA, dtype=f32, shape_class=shape_class(V=256)) == "cuda"
    assert resolve("sample_logits", None, CUDA, dtype=f32, shape_class=shape_class(V=1024)) == "cuda"
    assert resolve("sample_logits", None, CUDA, dtype=f32, shape_class=shape_class(V=1025)) == "triton"
    assert resolve("sample_logits", None, CUDA, dtype=torch.float64, shape_class=shape_class(V=256)) == "triton"
    assert resolve("pixel_cross_entropy", None, CUDA, shape_class=shape_class(V=2048)) == "triton"
    attn = dict(dropout=False, varlen=False)
    for d in (16, 32, 64, 80, 128):
        assert resolve("tiny_attention", None, CUDA, dtype=torch.bfloat16, shape_class=shape_class(D=d, **attn)) == "cuda"
    for d in (8, 48, 96):
        assert resolve("tiny_attention", None, CUDA, dtype=torch.bfloat16, shape_class=shape_class(D=d, **attn)) == "triton"
    assert resolve("tiny_attention", None, CUDA, dtype=torch.bfloat16,
                   shape_class=shape_class(D=64, dropout=True, varlen=False)) == "triton"
    # forced: an error that names the argument, not the binding's TORCH_CHECK
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run this call: cond_logits: V=2048 over"):
        resolve("sample_logits", "cuda", CUDA, dtype=f32, shape_class=shape_class(V=2048))
    with pytest.raises(BackendUnavailable, match="q: head dim D=48"):
        resolve("tiny_attention", "cuda", CUDA, dtype=f32, shape_class=shape_class(D=48, **attn))
    # no Triton either: PyTorch
    monkeypatch.setattr(dispatch, "_triton", lambda: (False, "no triton"))
    assert resolve("sample_logits", None, CUDA, dtype=f32, shape_class=shape_class(V=2048)) == "torch"


def _spy(monkeypatch, module, decisions):
    """Make ``module``'s dispatch call answer for a (fake) GPU, record that answer, then run on the torch backend."""
    real = dispatch.resolve

    def spy(op, backend, device, **kw):
        if backend in (None, "auto"):  # (the torch path of the packed entry calls the op again, forced)
            decisions.append(real(op, backend, CUDA, **kw))
        return real(op, "torch", device, **kw)
    monkeypatch.setattr(module, "resolve", spy)


def test_the_ops_hand_their_call_shape_to_the_dispatch(monkeypatch):
    """What each op's own call site would get on a GPU with every op verified: the shape reaches the dispatch."""
    from fractal_kernels.ops import pixel_cross_entropy as ce
    from fractal_kernels.ops import sample_logits as sl
    from fractal_kernels.ops import tiny_attention as ta
    _fake_gpu(monkeypatch, verified=("sample_logits", "pixel_cross_entropy", "tiny_attention"))
    got = []
    for module in (sl.api, ce.api, dispatch):  # (the attention choice calls resolve in dispatch)
        _spy(monkeypatch, module, got)
    for v in (256, 2048):
        sl.sample_logits(torch.randn(3, v), seed=0)
        ce.pixel_cross_entropy(torch.randn(4, 8), torch.randn(v, 8), torch.zeros(v), torch.zeros(4, dtype=torch.long))
    assert got == ["cuda", "cuda", "triton", "triton"]
    got.clear()
    for d in (64, 48):
        q = torch.randn(2, 2, 5, d)
        ta.tiny_attention(q, q, q)
        ta.tiny_attention_packed(torch.randn(2, 5, 3 * 2 * d), 2)
    assert got == ["cuda", "cuda", "triton", "triton"]
    got.clear()
    q = torch.randn(2, 2, 5, 64)
    with pytest.raises(BackendUnavailable):  # the torch backend underneath cannot run it (next test)
        ta.tiny_attention(q, q, q, seqlens=torch.tensor([5, 3]), dropout_p=0.1, dropout_seed=1)
    assert got == ["triton"]


def test_dropout_with_seqlens_goes_to_triton_not_torch_or_sdpa(monkeypatch):
    """The torch backend (and SDPA's path, which runs it for varlen/dropout) has no dropout with seqlens: on a
    GPU auto hands such calls to Triton even past the measured crossover; on a CPU auto says what runs it."""
    from fractal_kernels.ops import tiny_attention as ta
    _fake_gpu(monkeypatch, verified=("tiny_attention",), crossover={"bfloat16": {"64": 128}})
    bf16 = torch.bfloat16
    assert ta._choose("tiny_attention", None, bf16, CUDA, 64, 200) == "sdpa"
    assert ta._choose("tiny_attention", None, bf16, CUDA, 64, 200, dropout=True) == "sdpa"
    assert ta._choose("tiny_attention", None, bf16, CUDA, 64, 200, varlen=True) == "sdpa"
    assert ta._choose("tiny_attention", None, bf16, CUDA, 64, 200, dropout=True, varlen=True) == "triton"
    assert ta._choose("tiny_attention", None, bf16, CUDA, 64, 100, dropout=True, varlen=True) == "triton"
    assert ta._choose("tiny_attention", None, bf16, CUDA, 64, 100) == "cuda"
    with pytest.raises(BackendUnavailable, match="dropout_p: not supported together with seqlens"):
        ta._choose("tiny_attention", "torch", bf16, CUDA, 64, 100, dropout=True, varlen=True)


def test_dropout_with_seqlens_on_cpu(monkeypatch):
    """CPU: auto raises naming the argument and the backend that runs it; forced Triton (interpreter) runs it,
    and each sequence equals the reference on that sequence alone with the same Philox mask."""
    from fractal_kernels.ops.tiny_attention import tiny_attention
    from fractal_kernels.reference.attention import attention_dropout_scale, attention_reference
    n, h, length, d, p, seed = 2, 2, 6, 16, 0.3, 7
    q, k, v = (torch.randn(n, h, length, d) for _ in range(3))
    lens = torch.tensor([6, 4])
    with pytest.raises(BackendUnavailable, match="dropout_p: not supported together with seqlens.*backend='triton'"):
        tiny_attention(q, k, v, seqlens=lens, dropout_p=p, dropout_seed=seed)
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tiny_attention(q, k, v, seqlens=lens, dropout_p=p, dropout_seed=seed, backend="triton")
    keep = attention_dropout_scale(seed, n, h, length, length, p)
    for i, m in enumerate(lens.tolist()):
        ref = attention_reference(q[i:i + 1, :, :m], k[i:i + 1, :, :m], v[i:i + 1, :, :m],
                                  dropout_scale=keep[i:i + 1, :, :m, :m])
        torch.testing.assert_close(out[i:i + 1, :, :m], ref, atol=1e-5, rtol=1e-5)
        assert not out[i, :, m:].any()


# ------------------------------------------------------------------- issue 15 item 10: nothing looked up per call
def test_resolve_does_no_import_file_read_or_device_query_per_call(monkeypatch):
    """100 auto calls on a (fake) GPU: the extension import is tried once, the policy files are read once and
    the device name is asked once -- with the extension absent and with it present and verified."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    counts = {"import": 0, "open": 0, "name": 0}
    real_import, real_open = importlib.import_module, builtins.open

    def counting_import(name, *a, **kw):
        counts["import"] += name == "fractal_kernels._C"
        return real_import(name, *a, **kw)

    def counting_open(file, *a, **kw):
        counts["open"] += str(file).endswith(".json")
        return real_open(file, *a, **kw)

    def name(*a):
        counts["name"] += 1
        return "Fake GPU"
    monkeypatch.setattr(importlib, "import_module", counting_import)
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    dispatch.reload()
    for _ in range(100):  # no extension: Triton
        assert resolve("sample_logits", None, CUDA, dtype=torch.float32, shape_class=shape_class(V=256)) == "triton"
    assert counts["import"] <= 1 and counts["name"] <= 1, counts
    ext = types.ModuleType("fractal_kernels._C")
    ext.sample_logits = lambda *a: None
    monkeypatch.setitem(sys.modules, "fractal_kernels._C", ext)
    policy.write_document(policy.overlay_path(policy.VERIFIED), {"ops": ["sample_logits"]})
    dispatch.reload()
    counts.update(open=0, name=0, **{"import": 0})
    for _ in range(100):  # extension built and verified: CUDA
        assert resolve("sample_logits", None, CUDA, dtype=torch.float32, shape_class=shape_class(V=256)) == "cuda"
    assert counts["import"] <= 1 and counts["open"] <= len(policy.FILES) * 2 and counts["name"] <= 1, counts


def test_report_lists_every_backend():
    report = dispatch.backend_report()
    assert set(report) == {"cuda", "triton", "cpu", "torch"} and report["torch"][0]


def test_cpu_backend_only_for_ops_with_a_cpu_kernel(monkeypatch):
    """auto on a CPU tensor: the compiled CPU kernel for the ops in CPU_OPS when it builds, PyTorch for the rest;
    a forced "cpu" elsewhere (another op, a CUDA tensor, no compiler) is an error that says why."""
    cpu_dev = torch.device("cpu")
    assert dispatch.CPU_OPS == ("pixel_head_sample",)
    monkeypatch.setattr(dispatch, "_cpu_kernels", lambda: (True, "compiled C++"))
    assert resolve("pixel_head_sample", None, cpu_dev) == "cpu"
    assert resolve("sample_logits", None, cpu_dev) == "torch"
    with pytest.raises(BackendUnavailable, match="sample_logits: backend 'cpu' has no kernel"):
        resolve("sample_logits", "cpu", cpu_dev)
    with pytest.raises(BackendUnavailable, match="needs CPU tensors"):
        resolve("pixel_head_sample", "cpu", torch.device("cuda"))
    monkeypatch.setattr(dispatch, "_cpu_kernels", lambda: (False, "no C++ compiler found"))
    assert resolve("pixel_head_sample", None, cpu_dev) == "torch"
    with pytest.raises(BackendUnavailable, match="no C\\+\\+ compiler"):
        resolve("pixel_head_sample", "cpu", cpu_dev)


def test_jit_fallback_sources_and_cpu_behaviour(monkeypatch):
    """FRACTAL_KERNELS_JIT=1 compiles csrc/ on first use where CUDA exists; here it must stay a clean no."""
    import glob
    import os
    srcs = dispatch.cuda_sources()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert set(glob.glob(os.path.join(root, "csrc", "**", "*.cu"), recursive=True)) <= set(srcs)
    assert any(p.endswith("bindings.cpp") for p in srcs)
    monkeypatch.setenv("FRACTAL_KERNELS_JIT", "1")
    if not torch.cuda.is_available():
        assert dispatch._cuda_ext() is None  # no CUDA: no build attempted
        ok, why = dispatch.backend_report()["cuda"]
        assert not ok and "no CUDA device" in why
    assert dispatch.cuda_sources(root="/nonexistent") == []
