"""The GPU side of the kernel tests (issue #27, item 4), checked on a CPU: which device the kernel tests pick,
which test files run their CPU-tensor launches on the GPU, and the launch shim itself (``on_gpu.launch_on``)
with the CPU standing in for the GPU -- every CPU storage handed to a launch is replaced by a distinct copy
and copied back, so strided views, aliased arguments, in-place outputs and workspaces must come out bitwise as
without it. What this cannot check here: compiling and running the kernels on a GPU (no GPU on this machine).
"""
from __future__ import annotations

import pathlib

import pytest
import torch

import fractal_kernels as fk
from fractal_kernels.ops.ar_stack import ar_block_stack_decode, ar_stack_cache
from fractal_kernels.ops.mar_stack import mar_block_stack
from fractal_kernels.ops.pixel_head import _launch_triton as ph_launch
from fractal_kernels.reference.pixel_head import pack_pixel_head_weights

from tests import conftest
from tests.fractal_kernels import on_gpu
from tests.fractal_kernels.ops.test_pixel_head_gpu_configs import head
from tests.fractal_kernels.ops.test_stack_gpu_configs import ar_weights, mar_weights


def test_kernel_device_is_cuda_when_a_gpu_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert conftest.pick_kernel_device(torch.cuda.is_available()) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert conftest.pick_kernel_device(torch.cuda.is_available()) == torch.device("cpu")
    assert conftest.KERNEL_DEVICE == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_which_files_launch_on_the_gpu():
    here = pathlib.Path(__file__).parent
    assert conftest.launches_on_gpu(here / "ops" / "test_mar_stack.py")
    assert conftest.launches_on_gpu(here / "test_sampler_conformance.py")
    assert conftest.launches_on_gpu(here.parent / "models" / "test_fused_stack_ar.py")
    # the dispatcher's own tests check what a CPU tensor is refused; the AOT gate replays, it does not launch
    assert not conftest.launches_on_gpu(here / "test_dispatch.py")
    assert not conftest.launches_on_gpu(here.parent / "test_aot_gate.py")


def _calls():
    """Launch paths that stress the shim: strided q/k/v views of one packed tensor (tiny attention), a persistent
    grid with a workspace (MAR stack), an in-place cache (AR step), outputs plus aliased dummy arguments
    (pixel head: the workspace stands in for the absent ones)."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 5, 3 * 2 * 16, generator=g)
    mw = mar_weights(32, 64, 1, torch.float32)
    mx = torch.randn(3, 5, 32, generator=g)
    aw = ar_weights(32, 64, 1, torch.float32)
    ax, freqs = torch.randn(3, 32, generator=g), torch.randn(4, 8, 2, generator=g)
    cache0 = torch.randn(ar_stack_cache(aw, 3, 4, "cpu").shape, generator=g)
    pw = pack_pixel_head_weights(head(16, 1, 2, 32), torch.float32)
    cond, u = torch.randn(2 * 5, 32, generator=g), torch.rand(3, 5, generator=g, dtype=torch.float64)

    def attention():
        return [fk.tiny_attention_packed(qkv, 2, backend="triton")]

    def ar_step():
        cache = cache0.clone()
        return [ar_block_stack_decode(ax, aw, cache, 2, freqs, 2, backend="triton"), cache]

    def pixel_head():
        ids = torch.full((5, 3), -7, dtype=torch.int64)
        logits = torch.empty(3, 10, 256)
        ph_launch(cond, pw, 2, True, None, 3.0, 1.0, 1e-4, 0.9, False, u, 0, 0, 0, ids, logits=logits)
        return [ids, logits]
    return {"attention": attention, "mar_stack": lambda: [mar_block_stack(mx, mw, 2, backend="triton")],
            "ar_step": ar_step, "pixel_head": pixel_head}


@pytest.mark.parametrize("call", ["attention", "mar_stack", "ar_step", "pixel_head"])
def test_launch_shim_with_the_cpu_as_the_device(call, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    fn = _calls()[call]
    want = fn()
    moved = []
    run = InterpretedFunction.run

    def spy(self, *args, grid, warmup, **kwargs):  # what the kernel gets: no original CPU storage
        moved.append(self.__name__)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    originals = []
    to_device = on_gpu._Storages.to_device

    def watch(self, t):
        out = to_device(self, t)
        if isinstance(t, torch.Tensor):
            originals.append((t.untyped_storage().data_ptr(), out.untyped_storage().data_ptr()))
        return out

    monkeypatch.setattr(on_gpu._Storages, "to_device", watch)
    monkeypatch.setattr(InterpretedFunction, "run", on_gpu.launch_on(spy, torch.device("cpu")))
    got = fn()
    assert moved and originals and all(a != b for a, b in originals), "a launch saw an original CPU storage"
    for a, b in zip(want, got):
        assert torch.equal(a, b)
