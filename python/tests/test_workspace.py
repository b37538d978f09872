"""The CUDA backend's per-call work space comes from torch's caching
allocator (flex_context_set_allocator), on the call's stream, and goes back
to it: nothing stays allocated after the tensors are gone. On the CPU the
allocator is never installed. Run on CUDA with FLEXATTN_TEST_DEVICE=cuda.
"""

import os

import pytest
import torch

import flexattn.torch as fa
from flexattn.torch import _views

DEVICE = os.environ.get("FLEXATTN_TEST_DEVICE", "cpu")


def _step(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 160, 64, generator=g).to(DEVICE, dtype).requires_grad_()
               for _ in range(3))
    out = fa.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + 0.01 * (ki - qi))
    out.float().square().sum().backward()
    return q.grad, k.grad, v.grad


def test_work_space_from_torch_allocator():
    before = _views.workspace_allocations
    if DEVICE == "cpu":
        _step(torch.float32)
        assert _views.workspace_allocations == before
        assert not getattr(_views.device_context(torch.device("cpu")), "torch_allocator", None)
        return
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    grads = _step(torch.bfloat16)
    torch.cuda.synchronize()
    assert _views.workspace_allocations > before, "the backward took no work space from torch"
    assert all(torch.isfinite(g.float()).all() for g in grads)
    del grads
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == base, "work space was not given back to torch"


@pytest.mark.skipif(DEVICE == "cpu", reason="streams are CUDA's")
def test_work_space_on_the_current_stream():
    side = torch.cuda.Stream()
    seen = []
    real = torch.cuda.caching_allocator_alloc

    def spy(size, device=None, stream=None):
        seen.append(stream)
        return real(size, device=device, stream=stream)

    torch.cuda.caching_allocator_alloc = spy
    try:
        with torch.cuda.stream(side):
            _step(torch.bfloat16)
        side.synchronize()
    finally:
        torch.cuda.caching_allocator_alloc = real
    assert seen and all(s == side.cuda_stream for s in seen), seen


def test_allocator_callbacks_round_trip(monkeypatch):
    """The callbacks the library calls, through ctypes as the library calls
    them: torch's allocator gets the size, device and stream, its pointer
    comes back unchanged, the same pointer goes to its delete, and a refusal
    (an exception in torch) is a NULL return, not an exception in C."""
    import ctypes

    from flexattn import _runtime

    got, deleted = [], []

    def fake_alloc(size, device=None, stream=None):
        got.append((size, device, stream))
        if size > 4096:
            raise RuntimeError("CUDA out of memory (pretend)")
        return 0x7F0000001000

    monkeypatch.setattr(torch.cuda, "caching_allocator_alloc", fake_alloc)
    monkeypatch.setattr(torch.cuda, "caching_allocator_delete", deleted.append)
    ctx = _runtime.Context("cpu")  # a private context: the CPU backend never calls it
    before = _views.workspace_allocations
    _views._install_torch_allocator(ctx, 3)
    table = ctx.torch_allocator
    assert table.alloc(None, 256, ctypes.c_void_p(0x1234)) == 0x7F0000001000
    assert got == [(256, 3, 0x1234)]
    assert table.alloc(None, 64, None) == 0x7F0000001000  # the legacy stream is 0
    assert got[-1] == (64, 3, 0)
    table.free(None, ctypes.c_void_p(0x7F0000001000), None)
    assert deleted == [0x7F0000001000]
    assert table.alloc(None, 1 << 20, None) is None
    assert _views.workspace_allocations == before + 2
