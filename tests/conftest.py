import json
import os
import pathlib

import torch as _torch

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton.jit runs.
if not _torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FRACTAL_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
FIXTURES = ("tiny_mar", "tiny_ar", "tiny_mar_gp")


def pick_kernel_device(cuda_available: bool) -> torch.device:
    """Where the kernel tests put their tensors (issue #27, item 4): a GPU when there is one (the kernels compile
    for it; the interpreter is off), else the CPU, where the Triton kernels run in the interpreter."""
    return torch.device("cuda") if cuda_available else torch.device("cpu")


KERNEL_DEVICE = pick_kernel_device(_torch.cuda.is_available())


#: tests whose Triton launches on CPU tensors run on the GPU when there is one (``tests/fractal_kernels/on_gpu.py``)
ON_GPU_PATHS = ("tests/fractal_kernels/ops/", "tests/fractal_kernels/test_sampler_conformance.py", "tests/models/")


def launches_on_gpu(test_file: pathlib.Path) -> bool:
    """Whether a test file is one of :data:`ON_GPU_PATHS` (on a GPU machine its CPU-tensor launches run there)."""
    path = test_file.resolve()
    return path.is_relative_to(REPO) and path.relative_to(REPO).as_posix().startswith(ON_GPU_PATHS)


@pytest.fixture(autouse=True)
def _kernel_launches_on_gpu(request, monkeypatch):
    """On a GPU machine, the kernel tests' Triton launches with CPU tensors run on CUDA copies (issue #27, item 4;
    the same tests, references and tolerances as the interpreter suite). Nothing on a CPU-only machine."""
    if KERNEL_DEVICE.type != "cuda" or not launches_on_gpu(pathlib.Path(str(request.node.fspath))):
        yield
        return
    from tests.fractal_kernels.on_gpu import cpu_tests_on_cuda
    with cpu_tests_on_cuda(monkeypatch, KERNEL_DEVICE):
        yield


@pytest.fixture
def kernel_device() -> torch.device:
    """The device of a Triton kernel test's tensors (:func:`pick_kernel_device`): make inputs on the CPU with
    seeded generators and move them here; compare on the CPU against the same references and tolerances."""
    return KERNEL_DEVICE


def load_fixture(name: str):
    """(constructor kwargs, tensors) of a reference fixture; skips with the reason if shared/ is absent."""
    pt = REFERENCE / "fixtures" / f"{name}.pt"
    if not pt.exists():
        pytest.fail(f"reference fixture {pt} is missing (set FRACTAL_SHARED to the shared/ folder)")
    meta = json.loads((REFERENCE / "fixtures" / f"{name}.json").read_text())
    return meta, torch.load(pt, weights_only=True)


@pytest.fixture(scope="session", params=FIXTURES)
def fixture_model(request):
    from fractal_models import FractalGen
    meta, data = load_fixture(request.param)
    model = FractalGen(**meta["constructor"])
    model.load_state_dict(data["state_dict"], strict=True)
    model.eval()
    return request.param, model, data
