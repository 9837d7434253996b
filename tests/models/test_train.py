"""Training script: DDP == gradient accumulation, exact kill-and-resume, loss falls, clear failures."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fractal_models.checkpoint import read_checkpoint
from fractal_models.train import TrainError, build_parser, main, read_loss_log, resolve

pytest.importorskip("PIL", reason="training data needs Pillow (the [train] extra)")
try:
    from fractal_models.data import shipped_photo_dir
    shipped_photo_dir()
except Exception as e:  # noqa: BLE001
    pytest.fail(f"the shipped demo data is not installed: {e}")

TINY = ["--demo", "--demo-per-class", "16", "--batch-size", "8", "--save-every", "3", "--eval-every", "0",
        "--no-progress", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def run_cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "fractal_models.train", *args], env=ENV, capture_output=True,
                          text=True, timeout=300, **kw)


def state(path):
    return read_checkpoint(path)["model"]


def test_two_process_ddp_equals_single_process_accumulation(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "fractal_models.train", *TINY, "--max-steps", "4", "--output-dir", str(ddp)],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli([*TINY, "--max-steps", "4", "--grad-accum", "2", "--output-dir", str(single)])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = state(ddp / "checkpoint-last.pth"), state(single / "checkpoint-last.pth")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    losses_a, losses_b = read_loss_log(ddp), read_loss_log(single)
    assert [s for s, _ in losses_a] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(losses_a, losses_b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)


def test_kill_and_resume_reproduces_the_loss_sequence(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    steps = ["--max-steps", "30"]
    assert run_cli([*TINY, *steps, "--output-dir", str(full)]).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "fractal_models.train", *TINY, *steps, "--output-dir", str(killed)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 9:  # header + 8 steps: past the step-6 checkpoint
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ckpt_step = read_checkpoint(str(killed / "checkpoint-last.pth"))["train_state"]["step"]
    assert 6 <= ckpt_step < 30
    r = run_cli([*TINY, *steps, "--output-dir", str(killed), "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_loss_log(killed) == read_loss_log(full)
    a, b = state(full / "checkpoint-last.pth"), state(killed / "checkpoint-last.pth")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_falls_on_shipped_data(tmp_path):
    r = run_cli(["--demo", "--demo-per-class", "32", "--batch-size", "32", "--max-steps", "60", "--warmup-steps", "5",
                 "--eval-every", "60", "--eval-images", "40", "--save-every", "60", "--no-progress",
                 "--output-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [x for _, x in read_loss_log(tmp_path)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # the untrained loss sits at ln(256) = 5.545 nats with step-to-step noise ~0.01; 60 steps of batch 32 at
    # the demo lr bring it down by ~0.14 (seen), far outside that noise
    assert last < first - 0.08, (first, last)
    assert (tmp_path / "samples" / "step_0000060.png").exists()
    assert (tmp_path / "checkpoint-best.pth").exists()
    ckpt = read_checkpoint(str(tmp_path / "checkpoint-last.pth"))
    assert {"model", "optimizer", "epoch", "scaler", "args"} <= set(ckpt)  # the reference's layout


def _args(*extra):
    return build_parser().parse_args(list(extra))


@pytest.mark.parametrize("argv, world, match", [
    (["--demo", "--batch-size", "10"], 4, "--batch-size 10 is not divisible by world size 4"),
    (["--demo", "--batch-size", "16", "--grad-accum", "3"], 1, "not divisible by world size 1 x grad accum 3"),
    (["--data-path", "/nonexistent/imagenet"], 1, "--data-path '/nonexistent/imagenet': directory not found"),
    (["--config", "tiny_mar", "--data-path", "/", "--img-size", "64"], 1,
     "--img-size 64 does not match config 'tiny_mar', which models 16x16 images"),
    (["--config", "fractalmar_in64"], 1, "--data-path is required"),
    (["--config", "nope", "--demo"], 1, "unknown config 'nope'"),
    (["--demo", "--backend", "cuda"], 1, "--backend cuda: unavailable here"),
])
def test_bad_configs_fail_fast(argv, world, match):
    from fractal_kernels.dispatch import backend_report
    if "cuda" in argv and backend_report()["cuda"][0]:
        pytest.skip("the CUDA backend is available on this machine, so it is not a bad config here")
    with pytest.raises(TrainError, match=match.replace("(", r"\(").replace(")", r"\)")):
        resolve(_args(*argv), world)


def test_bad_configs_are_one_line_from_the_cli(tmp_path, capsys):
    assert main(["--data-path", str(tmp_path / "missing"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "directory not found" in err[0]
    corrupt = tmp_path / "checkpoint-last.pth"
    corrupt.write_bytes(b"\x00" * 100)
    assert main([*TINY, "--max-steps", "1", "--output-dir", str(tmp_path), "--resume", str(corrupt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable PyTorch checkpoint" in err[0]
