"""generate's numerics switch: ``precision="auto"`` = the public code's ``torch.cuda.amp.autocast()`` (fp16) on a
CUDA device, fp32 (no autocast) elsewhere; fp32/bf16/fp16 forced; the CLI's ``--precision``. The CUDA choice is
checked without a GPU through :func:`sampling_autocast_dtype` and by recording what ``generate`` hands it."""
import pytest
import torch

import fractal_models.sampling as sampling
from fractal_models import build_model, generate
from fractal_models.cli import main
from fractal_models.sampling import sampling_autocast_dtype

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize("device, precision, autocast_dtype, expected", [
    (CUDA, "auto", None, torch.float16),     # the public code's sampling numerics on a GPU
    (CPU, "auto", None, None),               # nothing changes on a CPU
    (torch.device("meta"), "auto", None, None),
    (CUDA, "fp32", None, None),
    (CUDA, "bf16", None, torch.bfloat16),
    (CPU, "bf16", None, torch.bfloat16),
    (CUDA, "fp16", None, torch.float16),
    (CUDA, "auto", torch.bfloat16, torch.bfloat16),  # the older argument, same meaning
    (CUDA, "auto", torch.float32, None),
    (CPU, "bf16", torch.bfloat16, torch.bfloat16),
    ("cuda", "auto", None, torch.float16),
])
def test_autocast_dtype_per_device(device, precision, autocast_dtype, expected):
    assert sampling_autocast_dtype(device, precision, autocast_dtype) == expected


@pytest.mark.parametrize("kwargs, match", [
    (dict(precision="half"), "precision: expected 'auto', 'fp32', 'bf16' or 'fp16'"),
    (dict(precision="fp16", autocast_dtype=torch.bfloat16), "disagree"),
    (dict(autocast_dtype=torch.int8), "autocast_dtype: expected"),
])
def test_bad_precision_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampling_autocast_dtype(CUDA, **kwargs)
    with pytest.raises(ValueError, match=match):
        generate(build_model("tiny_mar"), [1], num_iter_list=[1, 1], **kwargs)


def _autocast_seen(model):
    """(enabled, dtype) of CPU autocast while generate embeds the labels (inside its amp context)."""
    seen = []

    def hook(*_):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    handle = model.class_emb.register_forward_hook(hook)
    return seen, handle


@pytest.mark.parametrize("precision, enabled, dtype", [
    ("auto", False, None), ("fp32", False, None), ("bf16", True, torch.bfloat16)])
def test_generate_enters_the_chosen_autocast_on_cpu(precision, enabled, dtype):
    model = build_model("tiny_mar")
    seen, handle = _autocast_seen(model)
    try:
        generate(model, [1, 2], num_iter_list=[1, 1], seed=0, precision=precision)
    finally:
        handle.remove()
    assert seen and seen[0][0] == enabled
    if enabled:
        assert seen[0][1] == dtype


def test_auto_on_cpu_is_the_fp32_default_bit_for_bit():
    model = build_model("tiny_mar")
    kw = dict(num_iter_list=[2, 2], cfg=2.0, seed=3, backend="torch")
    assert torch.equal(generate(model, [1, 2], **kw), generate(model, [1, 2], precision="fp32", **kw))


def test_generate_asks_for_the_models_device_and_precision(monkeypatch):
    calls = []
    real = sampling.sampling_autocast_dtype

    def spy(device, precision="auto", autocast_dtype=None):
        calls.append((device, precision, autocast_dtype))
        return real(device, precision, autocast_dtype)
    monkeypatch.setattr(sampling, "sampling_autocast_dtype", spy)
    model = build_model("tiny_mar")
    generate(model, [0], num_iter_list=[1, 1], seed=0)
    generate(model, [0], num_iter_list=[1, 1], seed=0, precision="bf16")
    assert calls == [(CPU, "auto", None), (CPU, "bf16", None)]


def test_cli_precision_flag_reaches_generate(monkeypatch, tmp_path):
    got = []
    real = sampling.generate

    def spy(*a, **k):
        got.append(k.get("precision"))
        return real(*a, **k)
    monkeypatch.setattr(sampling, "generate", spy)
    for flag in ([], ["--precision", "bf16"], ["--precision", "fp32"]):
        assert main(["sample", "--config", "tiny_mar", "--labels", "1", "--num-iter-list", "1,1", "--quiet",
                     "--output", str(tmp_path / "g.png"), *flag]) == 0
    assert got == ["auto", "bf16", "fp32"]
    with pytest.raises(SystemExit):
        main(["sample", "--config", "tiny_mar", "--precision", "half"])
