"""fractal_models on the fused kernel backends: the fixtures still hold, gradients match the torch path.

On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest); on a GPU these
tests run the real kernels (and the CUDA ones when built).
"""
import pytest
import torch

from fractal_kernels.dispatch import last_backend
from fractal_models import FractalGen, generate, manual_seed, uniform_draw
from fractal_models.sampling import normalize_uint8
from tests.conftest import FIXTURES, load_fixture

BACKENDS = ["triton"] + (["cuda"] if torch.cuda.is_available() else [])


def model_for(name, backend):
    meta, data = load_fixture(name)
    model = FractalGen(**meta["constructor"], backend=backend)
    model.load_state_dict(data["state_dict"], strict=True)
    return model.eval(), data


def heads(model, data):
    levels = model.levels()
    out = [("pixel", levels[-1])]
    out += [(f"level{i}.guiding_pixel", g.guiding_pixel_loss) for i, g in enumerate(levels[:-1])
            if getattr(g, "guiding_pixel", False)]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_losses_and_sampling_on_kernels(name, backend):
    model, data = model_for(name, backend)
    for pre, head in heads(model, data):
        assert head.backend == backend
        cond = list(data[f"{pre}.cond_list"])
        with torch.no_grad():
            head.eval()
            torch.testing.assert_close(head(data[f"{pre}.target"], cond), data[f"{pre}.loss_eval"], atol=1e-5, rtol=1e-5)
            head.train()
            torch.testing.assert_close(head(data[f"{pre}.target"], cond), data[f"{pre}.loss_train"], atol=1e-5, rtol=1e-5)
            head.eval()
            assert last_backend("pixel_cross_entropy") == backend
            for k in range(3):
                s = f"{pre}.sample{k}"
                t, cfg, thr = data[f"{s}.settings"].tolist()
                u = data[f"{s}.uniforms"]
                pixels, probs = head.sample(list(data[f"{s}.cond_list"]), t, cfg, thr,
                                            draw=uniform_draw(lambda n, c: u[c]), return_probs=True)
                assert last_backend("sample_logits") == backend
                torch.testing.assert_close(probs, data[f"{s}.probs"], atol=1e-6, rtol=0)
                assert torch.equal(pixels, data[f"{s}.pixels"])
    if "model.loss_eval" in data:
        with torch.no_grad():
            torch.testing.assert_close(model(data["model.imgs"], data["model.labels"]), data["model.loss_eval"],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FIXTURES)
def test_training_gradients_match_torch_path(name, backend):
    imgs = normalize_uint8(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(1)))
    labels = torch.tensor([0, 4, 9])
    grads = {}
    for b in ("torch", backend):
        model, _ = model_for(name, b)
        model.train()
        manual_seed(0)  # torch's and numpy's RNGs: same masks, orders and dropout on both paths
        loss = model(imgs, labels)
        loss.backward()
        grads[b] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads[backend][0], grads["torch"][0], atol=1e-5, rtol=1e-5)
    assert grads[backend][1].keys() == grads["torch"][1].keys()
    for k, g in grads["torch"][1].items():
        torch.testing.assert_close(grads[backend][1][k], g, atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name", FIXTURES)
def test_generate_with_shared_uniforms_matches_across_backends(name):
    # every attention call, the KV-cached AR decode (with RoPE in the kernel) and the pixel head run on the
    # kernels here; sizes are kept small because on CPU each launch goes through the Triton interpreter
    model, _ = model_for(name, "torch")
    iters = [2] * (len(model.levels()) - 1)
    out = {}
    for b in ("torch", "triton"):
        g = torch.Generator().manual_seed(0)
        draw = uniform_draw(lambda n, c: torch.rand(n, generator=g, dtype=torch.float64))
        out[b] = generate(model, torch.tensor([2, 5]), cfg=2.5, num_iter_list=iters, seed=0, draw=draw, backend=b)
    assert model.backend == "torch"  # restored after the call
    assert (out["torch"] == out["triton"]).float().mean() >= 0.999


def test_seeded_generate_on_kernels_is_deterministic():
    model, _ = model_for("tiny_mar", "triton")
    a = generate(model, torch.tensor([1, 3]), cfg=2.0, num_iter_list=[2, 2], seed=11)
    b = generate(model, torch.tensor([1, 3]), cfg=2.0, num_iter_list=[2, 2], seed=11)
    assert torch.equal(a, b) and a.dtype == torch.uint8


def test_bad_backend_names_the_argument():
    model, _ = model_for("tiny_mar", "torch")
    with pytest.raises(ValueError, match="backend: expected 'torch', 'auto', 'triton' or 'cuda'"):
        model.set_backend("fast")


@pytest.mark.parametrize("name", ["tiny_mar", "tiny_ar"])
def test_bf16_autocast_matches_torch_path(name):
    """Under bf16 autocast the kernel path (fp32 scores, bf16 in/out) stays within bf16 tolerance of the
    reference path, forward loss and gradients."""
    imgs = normalize_uint8(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(2)))
    labels = torch.tensor([1, 7])
    res = {}
    for b in ("torch", "triton"):
        model, _ = model_for(name, b)
        model.train()
        manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(imgs, labels)
        loss.backward()
        res[b] = (float(loss), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert abs(res["triton"][0] - res["torch"][0]) <= 2e-2 * abs(res["torch"][0])
    g_t, g_r = res["triton"][1], res["torch"][1]
    assert (g_t - g_r).norm() <= 5e-2 * g_r.norm()


def test_training_with_attention_dropout_runs_on_the_kernels():
    """The paper's recipe trains with attention dropout 0.1: the kernel path applies it (its own Philox mask)
    instead of falling back to the reference attention; runs are reproducible under fractal_models.manual_seed."""
    meta, data = load_fixture("tiny_mar")
    kw = dict(meta["constructor"], attn_dropout=0.3)
    imgs = normalize_uint8(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8,
                                         generator=torch.Generator().manual_seed(3)))
    labels = torch.tensor([0, 5])
    losses = []
    for seed in (0, 0, 1):
        model = FractalGen(**kw, backend="triton")
        model.load_state_dict(data["state_dict"], strict=True)
        model.train()
        manual_seed(seed)
        loss = model(imgs, labels)
        loss.backward()
        assert last_backend("tiny_attention") == "triton"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses.append(float(loss))
    assert losses[0] == losses[1] and losses[0] != losses[2]
    model.eval()  # eval mode: no dropout, the fixture model's loss
    with torch.no_grad():
        torch.testing.assert_close(model.levels()[-1](data["pixel.target"], list(data["pixel.cond_list"])),
                                   data["pixel.loss_eval"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [1.0, 3.0, "per_row"])
def test_fused_pixel_head_in_the_fast_engine(cfg):
    """PixelLoss.sample(use_cache=True) on a kernel backend runs the whole pixel as one fractal_kernels op;
    with shared uniforms its pixels equal the torch path's (fp32, ids exact), and it consumes the global RNG
    like the reference (the rounding-noise draws), so the levels above keep their random orders."""
    from fractal_models.pixelloss import PixelLoss
    torch.manual_seed(0)
    head = PixelLoss(c_channels=24, width=32, depth=2, num_heads=2).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    n = 7
    cfg_arg = torch.linspace(1.5, 4.0, n) if cfg == "per_row" else cfg
    guided = cfg != 1.0
    cond = [torch.randn(2 * n if guided else n, 24)]
    out, state = {}, {}
    for backend in ("torch", "triton"):
        head.backend = backend
        g = torch.Generator().manual_seed(5)
        draw = uniform_draw(lambda rows, c: torch.rand(rows, generator=g, dtype=torch.float64))
        torch.manual_seed(9)
        with torch.no_grad():
            out[backend] = head.sample(cond, 1.3, cfg_arg, 1e-3, draw=draw, use_cache=True)
        state[backend] = torch.rand(4)  # where the global RNG stream stands afterwards
    assert last_backend("pixel_head_sample") == "triton"
    torch.testing.assert_close(out["triton"], out["torch"], rtol=0, atol=0)
    assert torch.equal(state["triton"], state["torch"])


def test_fused_pixel_head_weights_follow_parameter_updates():
    from fractal_models.pixelloss import PixelLoss
    head = PixelLoss(c_channels=8, width=16, depth=1, num_heads=2).eval()
    first = head._packed_weights()
    assert head._packed_weights() is first  # cached between calls
    with torch.no_grad():
        head.r_codebook.weight.add_(1.0)  # an optimizer step, in place
    again = head._packed_weights()
    assert again is not first and torch.equal(again.codebooks[0], head.r_codebook.weight)


def test_fused_pixel_head_failure_degrades_on_auto(monkeypatch):
    """On "auto" a fused pixel head that fails on the device (say, a Triton compile error on an untested GPU)
    warns once and falls back to the KV-cached PyTorch path; a forced backend raises instead."""
    import fractal_kernels.ops.pixel_head as ph_op
    import fractal_models.engine.pixel_head as pl  # the KV-cached head's dispatch lives in the engine
    from fractal_models.pixelloss import PixelLoss

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources")
    monkeypatch.setattr(ph_op, "pixel_head_sample", broken)
    monkeypatch.setattr(pl, "use_kernel", lambda backend, device=None: backend != "torch")  # as on a GPU
    torch.manual_seed(0)
    head = PixelLoss(c_channels=8, width=16, depth=1, num_heads=2).eval()
    cond = [torch.randn(6, 8)]
    torch.manual_seed(1)
    with torch.no_grad():
        ref = head.sample(cond, 1.0, 2.0, 1e-4, use_cache=True)  # torch backend
    head.backend = "triton"
    with pytest.raises(RuntimeError, match="out of resources"), torch.no_grad():
        head.sample(cond, 1.0, 2.0, 1e-4, use_cache=True)
    head.backend = "auto"
    torch.manual_seed(1)
    with pytest.warns(RuntimeWarning, match="falls back"), torch.no_grad():
        out = head.sample(cond, 1.0, 2.0, 1e-4, use_cache=True)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    with torch.no_grad():  # no second warning: the head remembers
        head.sample(cond, 1.0, 2.0, 1e-4, use_cache=True)
