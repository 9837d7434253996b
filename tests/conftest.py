import json
import os
import pathlib

import torch as _torch

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton.jit runs.
if not _torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pick_kernel_device(cuda_available: bool) -> torch.device:
    """Where the kernel tests put their tensors (issue #27, item 4): a GPU when there is one (the kernels compile
    for it; the interpreter is off), else the CPU, where the Triton kernels run in the interpreter."""
    return torch.device("cuda") if cuda_available else torch.device("cpu")


KERNEL_DEVICE = pick_kernel_device(_torch.cuda.is_available())


@pytest.fixture
def kernel_device() -> torch.device:
    """The device of a Triton kernel test's tensors (:func:`pick_kernel_device`): make inputs on the CPU with
    seeded generators and move them here; compare on the CPU against the same references and tolerances."""
    return KERNEL_DEVICE

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("FRACTAL_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
FIXTURES = ("tiny_mar", "tiny_ar", "tiny_mar_gp")


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
