"""Does this copy of fractal_kernels (installed wheel or checkout) take its dispatch decisions from its policy
data? Prints the decisions of three scenarios as one JSON line (wheel_smoke.sh runs it in the installed venv
and in the checkout and compares):

  shipped  the packaged files as built, an empty overlay
  overlay  a verified list and a crossover in the overlay ($FRACTAL_HOME)
  package  a verified list and a crossover in the package data (the installed copy: the real files inside
           site-packages, restored afterwards; the checkout: a copy, so the work tree is never touched)

A fake GPU ("Fake GPU", an extension module with every CUDA symbol, triton usable whether installed or not)
stands in for the hardware: only the dispatch is asked, nothing runs on it. Exits non-zero, saying why, when the data does not change the choice.

    python .ci/dispatch_data_check.py installed|checkout
"""
import json
import os
import shutil
import sys
import tempfile
import types

import torch

mode = sys.argv[1]
assert mode in ("installed", "checkout"), mode
home = tempfile.mkdtemp(prefix="fractal-home-")
os.environ["FRACTAL_HOME"] = home
torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_name = lambda *a: "Fake GPU"
ext = types.ModuleType("fractal_kernels._C")
for name in ("sample_logits", "ce_rows", "tiny_attention_fwd"):
    setattr(ext, name, lambda *a: None)
sys.modules["fractal_kernels._C"] = ext

import fractal_kernels  # noqa: E402
from fractal_kernels import dispatch, policy  # noqa: E402
from fractal_kernels._target import target_arch  # noqa: E402
from fractal_kernels.dispatch import resolve, shape_class  # noqa: E402
from fractal_kernels.ops import tiny_attention as ta  # noqa: E402

dispatch._triton = lambda: (True, "triton (assumed for this check)")  # the wheel's venv has no triton
_FAKE_ARCH = target_arch(90)  # the fake GPU is an sm_90 one (never asked of torch); held: its exit restores it
_FAKE_ARCH.__enter__()

where = os.path.dirname(fractal_kernels.__file__)
if mode == "installed":
    assert "site-packages" in where, f"fractal_kernels imported from {where}, not the installed wheel"
assert os.path.dirname(policy.PACKAGE_DIR) == where, (policy.PACKAGE_DIR, where)
for name in policy.FILES:
    assert os.path.isfile(policy.package_path(name)), f"package data {policy.package_path(name)} missing"
CUDA = torch.device("cuda", 0)
F32, BF16 = torch.float32, torch.bfloat16
VERIFIED = {"ops": ["pixel_cross_entropy", "sample_logits", "tiny_attention"], "runs": {}}
CROSSOVER = {"Fake GPU": {"bfloat16": {"64": 128}}}


def _ask(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except dispatch.BackendUnavailable as e:
        return f"BackendUnavailable: {e}"


def decisions():
    dispatch.reload()
    resolve_, choose = (lambda *a, **k: _ask(resolve, *a, **k)), (lambda *a, **k: _ask(ta._choose, *a, **k))
    return {
        "sample_logits V=256": resolve_("sample_logits", None, CUDA, dtype=F32, shape_class=shape_class(V=256)),
        "sample_logits V=2048": resolve_("sample_logits", None, CUDA, dtype=F32, shape_class=shape_class(V=2048)),
        "pixel_cross_entropy V=256": resolve_("pixel_cross_entropy", None, CUDA, shape_class=shape_class(V=256)),
        "attention D=64 L=100": choose("tiny_attention", None, BF16, CUDA, 64, 100),
        "attention D=64 L=200": choose("tiny_attention", None, BF16, CUDA, 64, 200),
        "attention D=48 L=100": choose("tiny_attention", None, BF16, CUDA, 48, 100),
        "attention D=64 L=200 dropout+seqlens": choose("tiny_attention", None, BF16, CUDA, 64, 200,
                                                           dropout=True, varlen=True),
    }


out = {"where": where, "shipped": decisions()}
policy.write_document(policy.overlay_path(policy.VERIFIED), VERIFIED)
policy.write_document(policy.overlay_path(policy.CROSSOVER), CROSSOVER)
out["overlay"] = decisions()
out["overlay_describe"] = policy.describe("Fake GPU", tuple(dispatch.CUDA_SYMBOLS))
for name in policy.FILES:
    os.unlink(policy.overlay_path(name))

backup = tempfile.mkdtemp(prefix="fractal-pkgdata-")
if mode == "checkout":  # never write into the work tree: a copy of the package data stands in for it
    policy.PACKAGE_DIR = shutil.copytree(policy.PACKAGE_DIR, os.path.join(backup, "data"))
else:
    shutil.copytree(policy.PACKAGE_DIR, os.path.join(backup, "data"))
try:
    policy.write_document(policy.package_path(policy.VERIFIED), VERIFIED)
    policy.write_document(policy.package_path(policy.CROSSOVER), CROSSOVER)
    out["package"] = decisions()
    out["package_describe"] = policy.describe("Fake GPU", tuple(dispatch.CUDA_SYMBOLS))
finally:
    if mode == "installed":
        for name in policy.FILES:
            shutil.copy2(os.path.join(backup, "data", name), policy.package_path(name))
    shutil.rmtree(backup)
    shutil.rmtree(home)

problems = []
for scenario in ("overlay", "package"):
    got = out[scenario]
    expected = {"sample_logits V=256": "cuda", "sample_logits V=2048": "triton", "pixel_cross_entropy V=256": "cuda",
                "attention D=64 L=100": "cuda", "attention D=64 L=200": "sdpa", "attention D=48 L=100": "triton",
                "attention D=64 L=200 dropout+seqlens": "triton"}
    problems += [f"{scenario}: {k} -> {got[k]}, expected {v}" for k, v in expected.items() if got[k] != v]
    src = policy.overlay_path if scenario == "overlay" else policy.package_path
    if not any(src(policy.VERIFIED) in line for line in out[f"{scenario}_describe"]):
        problems.append(f"{scenario}: describe() does not name {src(policy.VERIFIED)}")
if out["shipped"] == out["overlay"]:
    problems.append("the overlay's data changed no decision")
print(json.dumps(out, sort_keys=True))
if problems:
    print("dispatch data check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
