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
