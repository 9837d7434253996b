"""fractalgen sample --num-images: class-balanced numbering, atomic PNGs, resumable, independent of the
number of ranks (chunks dealt round-robin), samples.npz once complete."""
import os

import numpy as np
import pytest
import torch

from fractal_models.cli import main
from tests.conftest import REFERENCE, load_fixture

CONFIG = str(REFERENCE / "fixtures" / "tiny_mar.json")
ARGS = ["sample", "--config", CONFIG, "--num-images", "5", "--batch-size", "2", "--num-iter-list", "2,2",
        "--cfg", "2", "--seed", "3", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    torch.save({"model": load_fixture("tiny_mar")[1]["state_dict"]}, path)
    return str(path)


def run(out, monkeypatch, ckpt, rank=0, world=1, extra=()):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # no process group: ranks run one after the other here
    assert main(ARGS + ["--output-dir", str(out), "--checkpoint", ckpt, *extra]) == 0


def load(out):
    with np.load(out / "samples.npz") as z:
        return z["arr_0"]


def test_bulk_sampling_resumes_and_does_not_depend_on_ranks(tmp_path, monkeypatch, capsys, checkpoint):
    single = tmp_path / "single"
    run(single, monkeypatch, checkpoint)
    imgs = load(single)
    assert imgs.shape == (5, 16, 16, 3) and imgs.dtype == np.uint8
    assert sorted(os.listdir(single / "images")) == [f"{i:05d}.png" for i in range(5)]

    # resume: a lost PNG is regenerated (same pixels), finished chunks are not touched
    kept = single / "images" / "00000.png"
    mtime = kept.stat().st_mtime_ns
    (single / "images" / "00003.png").unlink()
    (single / "samples.npz").unlink()
    run(single, monkeypatch, checkpoint)
    assert "generated 1 batches, 2 already done" in capsys.readouterr().out
    assert kept.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(load(single), imgs)

    # two ranks (chunks 0, 2 on rank 0; chunk 1 on rank 1): the same images
    shard = tmp_path / "shard"
    run(shard, monkeypatch, checkpoint, rank=1, world=2)
    assert not (shard / "samples.npz").exists()  # incomplete until rank 0 has run
    run(shard, monkeypatch, checkpoint, rank=0, world=2)
    np.testing.assert_array_equal(load(shard), imgs)

    # the fast path writes the same images
    fast = tmp_path / "fast"
    run(fast, monkeypatch, checkpoint, extra=("--fast",))
    np.testing.assert_array_equal(load(fast), imgs)


def test_bulk_sampling_needs_an_output_dir(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(ARGS) == 2
    assert "--num-images needs --output-dir" in capsys.readouterr().err


def test_bulk_sampling_under_torchrun(tmp_path, checkpoint):
    """Two gloo processes: each makes its chunks, rank 0 writes the npz after the barrier; same images."""
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out, single = tmp_path / "ddp", tmp_path / "single"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "fractal_models.cli", *ARGS, "--checkpoint", checkpoint, "--output-dir", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rank 1/2: generated 1 batches" in r.stdout and "rank 0/2: generated 2 batches" in r.stdout
    env1 = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
    r = subprocess.run([sys.executable, "-m", "fractal_models.cli", *ARGS, "--checkpoint", checkpoint,
                        "--output-dir", str(single)], env=env1, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_array_equal(load(out), load(single))
