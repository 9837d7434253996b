"""No silent fallback where it is measured: benchmark rows record the backend that ran and fail when it is not
the one they name; kernel rows check their outputs against the reference of the same run (ids through the
sampler contract or a distribution test, losses and gradients within stated tolerances); a fused pixel head
that warns and falls back fails its row. Each case breaks one thing on purpose and expects a failed row."""
import torch

from benchmarks import attention, cases, kernels, opcount
from benchmarks.cases import MODES
from benchmarks.harness import failed
from fractal_kernels import dispatch
from fractal_kernels.reference.pixel_sampling import inverse_cdf_draw

CPU = torch.device("cpu")


def _row(rows, backend):
    (r,) = [r for r in rows if r.backend == backend and not r.skipped]
    return r


def test_sampler_row_fails_when_another_backend_ran(monkeypatch):
    real = kernels.sample_logits

    def elsewhere(*a, **k):
        out = real(*a, **k)
        dispatch.record("sample_logits", "cpu")  # what a silent fallback would leave behind
        return out
    monkeypatch.setattr(kernels, "sample_logits", elsewhere)
    r = _row(kernels.sampler_rows(500, True, CPU, repeats=1, warmup=0), "torch")
    assert failed(r.__dict__) and "SAMPLE_LOGITS RAN ON CPU, NOT TORCH" in r.check
    assert r.metrics["ran_on"] == {"sample_logits": "cpu"}


def test_sampler_row_checks_ids_against_the_contract(monkeypatch):
    real = kernels.sample_logits

    def one_bad_id(*a, **k):  # one row of 4000 draws an id far from its uniform's CDF step: 99.975 % still agree
        ids = real(*a, **k).clone()
        ids[7] = (ids[7] + 128) % 256
        return ids
    monkeypatch.setattr(kernels, "sample_logits", one_bad_id)
    r = _row(kernels.sampler_rows(4000, True, CPU, repeats=1, warmup=0), "torch")
    assert failed(r.__dict__) and "1 OF 4000 IDS BREAK THE SAMPLER CONTRACT" in r.check and "99.9750%" in r.check


def test_sampler_contract_allows_near_ties_only():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(300, 256, generator=g) * 3, -1)
    u = torch.rand(300, generator=g, dtype=torch.float64)
    ids = inverse_cdf_draw(probs, u)
    assert not kernels.ids_contract_check(ids, ids, probs, u).isupper()
    cdf = probs.double().cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    tie = u.clone()
    tie[0] = cdf[0, 100] + 1e-7  # just past a step: the entry before it is a legal near-tie draw
    near = inverse_cdf_draw(probs, tie)
    moved = near.clone()
    moved[0] = 100
    assert near[0] == 101 and not kernels.ids_contract_check(moved, near, probs, tie).isupper()
    far = near.clone()
    far[0] = 50  # a CDF step far from u: a wrong draw
    assert kernels.ids_contract_check(far, near, probs, tie).isupper()


def test_distribution_check_tells_right_from_wrong_distributions():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(20000, 256, generator=g) * 2, -1)
    right = torch.multinomial(probs, 1, generator=g)[:, 0]
    assert not kernels.distribution_check(right, probs).isupper()
    wrong = torch.randint(0, 256, (20000,), generator=g)  # uniform over the support, not p
    assert kernels.distribution_check(wrong, probs).isupper()


def test_cross_entropy_row_checks_gradients_not_only_the_loss(monkeypatch):
    real = kernels.pixel_cross_entropy

    def wrong_grad(x, w, b, t, **k):  # the same loss value, a gradient off by 1e-2 in x
        loss = real(x, w, b, t, **k)
        return loss + (x * 1e-2).sum() - (x * 1e-2).sum().detach()
    rows = kernels.cross_entropy_rows(256, 64, CPU, repeats=1, warmup=0)
    assert not failed(_row(rows, "torch").__dict__) and _row(rows, "torch").metrics["ran_on"] == {
        "pixel_cross_entropy": "torch"}
    monkeypatch.setattr(kernels, "pixel_cross_entropy", wrong_grad)
    r = _row(kernels.cross_entropy_rows(256, 64, CPU, repeats=1, warmup=0), "torch")
    assert failed(r.__dict__) and "GRADS MAX ERR" in r.check and r.metrics["loss_rel_err"] <= 1e-5


def test_attention_row_fails_when_another_backend_ran(monkeypatch):
    real = attention.tiny_attention

    def elsewhere(*a, **k):
        out = real(*a, **k)
        dispatch.record("tiny_attention", "triton")
        return out
    monkeypatch.setattr(attention, "tiny_attention", elsewhere)
    rows = attention.attention_rows(attention.SHAPES[2], 8, False, CPU, repeats=1, warmup=0)
    r = _row(rows, "tiny_attention[torch]")
    assert failed(r.__dict__) and "TINY_ATTENTION RAN ON TRITON, NOT TORCH" in r.check
    assert not failed(_row(rows, "reference").__dict__)


def _break_fused_head(monkeypatch):
    """The fused pixel head is there (as on a GPU, or a CPU with a compiler) but fails when called."""
    from fractal_models.pixelloss import PixelLoss

    def broken(self, *a, **k):
        raise RuntimeError("simulated kernel failure")
    original = PixelLoss._fused_head_backend
    monkeypatch.setattr(PixelLoss, "_fused_head_backend",
                        lambda self, device: "cpu" if self.backend == "auto" else original(self, device))
    monkeypatch.setattr(PixelLoss, "_sample_fused_head", broken)
    monkeypatch.setattr(cases, "fused_head_expected", lambda backend, device, fast=True: fast and backend != "torch")
    monkeypatch.setattr(opcount, "fused_head_expected", cases.fused_head_expected)


def test_fused_head_fallback_warning_fails_the_generate_row(monkeypatch):
    _break_fused_head(monkeypatch)
    mode = MODES["smoke"]
    base = cases.generate_rows("tiny_mar", mode, CPU, "torch", fast=False)
    assert not failed(base.__dict__)
    row = cases.generate_rows("tiny_mar", mode, CPU, "auto", fast=True, baseline=base)  # warns, falls back
    assert failed(row.__dict__), row.check
    assert "FALLBACK WARNING" in row.check and "PIXEL_HEAD_SAMPLE DID NOT RUN" in row.check


def test_fused_head_fallback_fails_the_opcount_row(monkeypatch):
    _break_fused_head(monkeypatch)
    monkeypatch.setattr(dispatch, "backend_report", lambda: {**_report(), "cpu": (True, "pretend")})
    monkeypatch.setattr(opcount, "backend_report", dispatch.backend_report)
    rows = opcount.opcount_rows("tiny_mar", 2, [2, 2], CPU, time_it=False, kernels=False)
    auto = [r for r in rows if r.name == "generate[fast,auto]"]
    assert auto and failed(auto[0].__dict__) and "FALLBACK WARNING" in auto[0].check
    assert not any(failed(r.__dict__) for r in rows if r.backend == "torch")


_REAL_REPORT = dispatch.backend_report


def _report():
    return _REAL_REPORT()
