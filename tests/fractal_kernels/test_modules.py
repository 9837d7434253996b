"""swap_attention: modules written like the public reference's (same parameter names, explicit math) are
replaced by the kernel drop-ins; weights, names and outputs are kept, and the kernels run."""
import pytest
import torch
from torch import nn

from fractal_kernels.dispatch import last_backend
from fractal_kernels.modules import swap_attention
from fractal_models import ar, mar, pixelloss


class RefAttention(nn.Module):
    """The MAR level's attention as the reference writes it (parameter names qkv, proj)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=True), nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * self.scale)
        if self.causal:
            a = a.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))

    causal = False


class RefCausalAttention(RefAttention):
    causal = True


class RefLlamaAttention(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.dim, self.n_head, self.head_dim = dim, n_head, dim // n_head
        self.wqkv, self.wo = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.attn_dropout_p, self.resid_dropout = 0.0, nn.Dropout(0.1)

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.n_head, self.head_dim) for t in self.wqkv(x).split(self.dim, -1))
        q, k = ar.apply_rotary_emb(q, freqs_cis), ar.apply_rotary_emb(k, freqs_cis)
        o = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       is_causal=True)
        return self.resid_dropout(self.wo(o.transpose(1, 2).reshape(b, n, self.dim)))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([RefAttention(64, 4), RefCausalAttention(32, 2)])
        self.proj_in = nn.Linear(64, 32)
        self.llama = RefLlamaAttention(32, 2)
        self.freqs = ar.precompute_freqs_cis_2d(3, 16)  # 1 + 9 positions

    def forward(self, x):
        h = self.proj_in(self.blocks[0](x))
        h = self.blocks[1](h)
        return self.llama(h, self.freqs[: h.shape[1]])


def test_swap_keeps_names_weights_and_outputs():
    torch.manual_seed(0)
    model = Toy().eval()
    x = torch.randn(3, 10, 64)
    expected = model(x)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    swap_attention(model, "triton")
    assert isinstance(model.blocks[0], mar.Attention) and isinstance(model.blocks[1], pixelloss.CausalAttention)
    assert isinstance(model.llama, ar.Attention)
    assert model.state_dict().keys() == keys.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, keys[k]), k
    got = model(x)
    assert last_backend("tiny_attention") == "triton"
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    model.load_state_dict(keys, strict=True)  # the original model's checkpoint still loads


def test_swap_switches_existing_drop_ins_and_checks_backend():
    m = nn.Sequential(mar.Attention(32, 2))
    swap_attention(m, "torch")
    assert m[0].backend == "torch"
    with pytest.raises(ValueError, match="backend: expected one of"):
        swap_attention(m, "fast")
