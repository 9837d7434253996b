"""fractalgen CLI: info, sample (PNG grid), nll; failures are one line and exit status 2."""
import json
import struct
import zlib

import numpy as np
import pytest
import torch

from fractal_models import build_model, save_checkpoint
from fractal_models.cli import main


def read_png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "fractalmar_large_in256: 437.0M parameters" in out
    assert "torch   available" in out
    # which file each dispatch decision comes from (package data, then the $FRACTAL_HOME overlay)
    assert "fractal_kernels/data/cuda_verified.json" in out and "cuda sample_logits: " in out
    assert "attention crossover" in out


def test_sample_writes_png_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["sample", "--config", "tiny_mar", "--labels", "0,1,2", "--cfg", "2", "--num-iter-list", "2,2",
                 "--output", str(out), "--nrow", "2", "--quiet"])
    assert code == 0
    assert read_png_size(out) == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    assert "randomly initialised" in capsys.readouterr().out


def test_sample_from_checkpoint_is_deterministic(tmp_path):
    ckpt = tmp_path / "ckpt.pth"
    save_checkpoint(str(ckpt), build_model("tiny_ar"), epoch=1)
    outs = []
    for i in range(2):
        out = tmp_path / f"g{i}.png"
        assert main(["sample", "--config", "tiny_ar", "--checkpoint", str(ckpt), "--labels", "3", "--seed", "5",
                     "--output", str(out), "--quiet"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_sample_fast_default_equals_faithful(tmp_path):
    """The CLI samples with the fast engine by default. With --backend torch it writes the same PNG as the
    reference loop (--faithful), bit for bit; the default (on a CPU: + the compiled C++ pixel head, fed the
    reference's draws) the same pixels up to near-ties of the draws (measured identical; bound 99 %)."""
    from PIL import Image
    outs = []
    for extra in ([], ["--faithful"], ["--backend", "torch"]):
        out = tmp_path / f"g{len(outs)}.png"
        assert main(["sample", "--config", "tiny_mar_gp", "--labels", "1,4", "--cfg", "3", "--seed", "2",
                     "--num-iter-list", "2,2,2", "--output", str(out), "--quiet", *extra]) == 0
        outs.append(out)
    assert outs[1].read_bytes() == outs[2].read_bytes()
    default, faithful = (np.asarray(Image.open(p)) for p in outs[:2])
    assert default.shape == faithful.shape and (default == faithful).mean() >= 0.99


def test_nll(tmp_path, capsys):
    imgs = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "val.npz", imgs)
    assert main(["nll", "--config", "tiny_ar", "--images", str(tmp_path / "val.npz")]) == 0
    assert "bits/dim over 3 images" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["sample", "--config", "tiny_mar", "--checkpoint", "/nonexistent.pth"], "file not found"),
    (["sample", "--config", "nope"], "unknown config 'nope'"),
    (["sample", "--config", "tiny_mar", "--temperature", "0"], "temperature"),
    (["sample", "--config", "tiny_mar", "--labels", "42"], "labels"),
    (["sample", "--config", "tiny_mar", "--cuda-graphs", "--device", "cpu"], "cuda_graphs"),
    (["nll", "--config", "tiny_mar", "--images", "/nonexistent.npz"], "file not found"),
])
def test_errors_are_one_line(argv, match, capsys):
    assert main(argv + ["--quiet"] if argv[0] == "sample" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fractalgen: error:") and match in err[0]


def test_mismatched_checkpoint_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pth"
    save_checkpoint(str(ckpt), build_model("tiny_ar"))
    assert main(["sample", "--config", "tiny_mar", "--checkpoint", str(ckpt), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the model" in err[0]
