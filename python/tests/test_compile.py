"""A small model using flexattn.torch compiles with fullgraph=True (no graph
break), forward and backward, and gives the eager results, including the
gradient of a learnable bias its score mod captures."""

import os
import tempfile

import pytest
import torch

import flexattn.torch as fa

DEVICE = os.environ.get("FLEXATTN_TEST_DEVICE", "cpu")


class TinyAttention(torch.nn.Module):
    def __init__(self, S, heads=2, dim=16):
        super().__init__()
        self.S, self.heads, self.dim = S, heads, dim
        self.qkv = torch.nn.Linear(heads * dim, 3 * heads * dim)
        self.rel_bias = torch.nn.Parameter(torch.randn(heads, 2 * S) * 0.1)
        bias = self.rel_bias

        def score_mod(score, b, h, q_idx, kv_idx):
            return 20.0 * torch.tanh(score / 20.0) + bias[h, q_idx - kv_idx + S]
        self.score_mod = score_mod

    def forward(self, x, block_mask):
        B = x.shape[0]
        q, k, v = self.qkv(x).view(B, self.S, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        y = fa.flex_attention(q, k, v, score_mod=self.score_mod, block_mask=block_mask)
        return y.transpose(1, 2).reshape(B, self.S, -1)


def test_compile_fullgraph_forward_backward(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp())
    torch.manual_seed(0)
    S = 64
    model = TinyAttention(S).to(DEVICE)
    x = torch.randn(2, S, 32, device=DEVICE)
    mask = fa.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, S, S, device=DEVICE,
                                BLOCK_SIZE=16)
    eager = model(x, mask)
    try:
        eager.square().sum().backward()
    except NotImplementedError as e:
        if DEVICE == "cpu":
            raise
        pytest.xfail(f"CUDA backward not available: {e}")
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, mask)
    out.square().sum().backward()
    assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-4, rtol=1e-4), name
    assert grads["rel_bias"].abs().sum() > 0


def test_custom_op_opcheck():
    """torch's own checker of custom ops (schema, fake tensors, autograd)."""
    q, k, v = (torch.randn(1, 2, 24, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, device=DEVICE)
    spec = "1|bias:0:1|score + bias[h]"
    torch.library.opcheck(torch.ops.flexattn.attention.default,
                          (q, k, v, [bias], spec, [], [], "", [], 0.35, []),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
