"""Dispatch: forced backends, graceful auto choice, visible decisions."""
import pytest
import torch

from fractal_kernels import dispatch
from fractal_kernels.dispatch import BackendUnavailable, last_backend, resolve


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
    class FakeExt:
        sample_logits = ce_rows = staticmethod(lambda *a: None)
    monkeypatch.setattr(dispatch, "_cuda_ext", lambda: FakeExt)
    monkeypatch.setattr(dispatch, "_triton", lambda: (True, "fake"))
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(dispatch, "cuda_verified_ops", lambda: [])
    assert resolve("sample_logits", "auto", cuda) == "triton"
    monkeypatch.setattr(dispatch, "cuda_verified_ops", lambda: ["sample_logits", "pixel_cross_entropy"])
    assert resolve("sample_logits", "auto", cuda) == "cuda"
    assert resolve("pixel_cross_entropy", "auto", cuda) == "cuda"
    monkeypatch.setattr(dispatch, "_triton", lambda: (False, "no triton"))
    monkeypatch.setattr(dispatch, "cuda_verified_ops", lambda: [])
    assert resolve("sample_logits", "auto", cuda) == "torch"


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
