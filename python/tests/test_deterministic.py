"""torch.use_deterministic_algorithms(True) reaches the library's backward
(opts->deterministic): gradients that are the same bits every run, and the
CUDA backward's buffer gradients, which have no deterministic
implementation, refused as torch refuses its own such operations (a warning
instead with warn_only=True). Run on CUDA with FLEXATTN_TEST_DEVICE=cuda.
"""

import contextlib
import os

import pytest
import torch

import flexattn._library as L
import flexattn.torch as fa
from flexattn.torch import _op

DEVICE = os.environ.get("FLEXATTN_TEST_DEVICE", "cpu")
B, HQ, HKV, LEN, D = 1, 4, 2, 100, 32


@contextlib.contextmanager
def torch_deterministic(warn_only=False):
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def bits(t):
    return t.detach().contiguous().view(torch.uint8)


def _problem(dtype):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device=DEVICE, dtype=dtype)  # noqa: E731
    q, k, v = make(B, HQ, LEN, D), make(B, HKV, LEN, D), make(B, HKV, LEN, D)
    dout = make(B, HQ, LEN, D)
    slopes = torch.rand(HQ, generator=g).to(DEVICE)
    return q, k, v, dout, slopes


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _grads(problem, learn_slopes=False):
    """dq, dk, dv (and the ALiBi slopes' gradient) of a causal ALiBi
    attention with GQA and a block mask with partial blocks."""
    q, k, v, dout, slopes = problem
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    s = slopes.detach().requires_grad_(learn_slopes)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + s[h] * (kv_idx - q_idx)

    bm = fa.create_block_mask(_causal, 1, 1, LEN, LEN, device=DEVICE, BLOCK_SIZE=32)
    out = fa.flex_attention(q, k, v, score_mod=alibi, block_mask=bm, enable_gqa=True)
    inputs = [q, k, v] + ([s] if learn_slopes else [])
    return torch.autograd.grad(out, inputs, dout)


def test_flag_follows_torch():
    # device objects only: no GPU is needed to decide
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _op._deterministic(cpu, []) == 0
    assert _op._deterministic(cuda, ["bias"]) == 0
    with torch_deterministic():
        assert _op._deterministic(cpu, []) == 1
        assert _op._deterministic(cpu, ["bias"]) == 1
        assert _op._deterministic(cuda, []) == 1
        with pytest.raises(RuntimeError,
                           match="'bias' does not have a deterministic implementation"):
            _op._deterministic(cuda, ["bias"])
    with torch_deterministic(warn_only=True):
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            assert _op._deterministic(cuda, ["bias"]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_backward(monkeypatch, dtype):
    seen = []
    real = L.lib.flex_attention_backward

    def spy(*args):
        seen.append(args[9]._obj.deterministic)  # the options struct
        return real(*args)

    monkeypatch.setattr(L.lib, "flex_attention_backward", spy)
    problem = _problem(dtype)
    plain = _grads(problem)
    with torch_deterministic():
        first = _grads(problem)
        second = _grads(problem)
    assert seen == [0, 1, 1]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b, c in zip(plain, first, second):
        assert torch.equal(bits(b), bits(c)), "two deterministic runs differ"
        if DEVICE == "cpu":  # deterministic in either mode
            assert torch.equal(bits(a), bits(b))
        else:
            scale = a.float().abs().max().item()
            assert (a.float() - b.float()).abs().max().item() <= tol * scale


def test_buffer_gradients():
    problem = _problem(torch.float32)
    if DEVICE == "cpu":
        with torch_deterministic():
            first = _grads(problem, learn_slopes=True)
            second = _grads(problem, learn_slopes=True)
        for b, c in zip(first, second):
            assert torch.equal(bits(b), bits(c))
        return
    with torch_deterministic():
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            _grads(problem, learn_slopes=True)
    with torch_deterministic(warn_only=True):
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            grads = _grads(problem, learn_slopes=True)
    assert all(torch.isfinite(g).all() for g in grads)
