"""Reference-layout checkpoints: strict, code-free loading; one clear line for every bad file."""
import argparse
import os
import pickle

import pytest
import torch

from fractal_models import CheckpointError, build_model, load_checkpoint, save_checkpoint
from fractal_models.checkpoint import read_checkpoint
from fractal_models.sampling import normalize_uint8


def reference_layout_checkpoint(path, model):
    """What the reference's training script writes: model, optimizer, epoch, scaler, args (a Namespace)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    imgs = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    loss = model(normalize_uint8(imgs), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    args = argparse.Namespace(model="tiny_mar", img_size=16, cfg=1.0, num_iter_list="64,16", blr=5e-5)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}, "args": args}, path)


def test_round_trip_strict(tmp_path):
    torch.manual_seed(0)
    src = build_model("tiny_mar")
    path = str(tmp_path / "checkpoint-last.pth")
    reference_layout_checkpoint(path, src)
    dst = build_model("tiny_mar")
    ckpt = load_checkpoint(path, dst)
    assert ckpt["epoch"] == 3 and ckpt["args"].model == "tiny_mar"
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k


def test_other_config_is_one_clear_line(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model": build_model("tiny_ar").state_dict()}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, build_model("tiny_mar"))
    msg = str(e.value)
    assert "\n" not in msg and "does not match the model" in msg and "missing" in msg


def test_published_config_is_named(tmp_path):
    from fractal_models.checkpoint import _mismatch, identify_config
    with torch.device("meta"):
        state = build_model("fractalmar_base_in256").state_dict()
        other = build_model("fractalmar_large_in256")
    assert "with other shapes" in _mismatch(other, state)
    assert identify_config(state) == "fractalmar_base_in256"


def test_missing_garbage_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        read_checkpoint(str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint|refused to unpickle"):
        read_checkpoint(str(junk))
    lst = tmp_path / "list.pth"
    torch.save([1, 2, 3], lst)
    with pytest.raises(CheckpointError, match="expected a dict with a 'model' state_dict"):
        read_checkpoint(str(lst))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_arbitrary_code_is_not_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_checkpoint(str(path))


def test_save_is_atomic(tmp_path, monkeypatch):
    model = build_model("tiny_ar")
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, model, epoch=1)
    good = open(path, "rb").read()

    def boom(*a, **k):
        raise KeyboardInterrupt  # killed mid-write
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, epoch=2)
    assert open(path, "rb").read() == good  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temp file left behind
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 1
