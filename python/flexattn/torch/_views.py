"""torch tensors as flex_tensor views, and the context of a tensor's device.

A view borrows the tensor's memory: whoever makes one keeps the tensor alive
until the library is done with it (for the duration of a call, or as long as
a mod keeps the binding).
"""

import ctypes

import torch

from .. import _library as L
from .. import _runtime

DTYPES = {torch.float32: L.F32, torch.float16: L.F16, torch.bfloat16: L.BF16,
          torch.int32: L.I32, torch.int64: L.I64, torch.uint8: L.U8, torch.bool: L.BOOL}
# Buffer dtypes the library does not read, and the dtype of the copy it reads.
BUFFER_COPIES = {torch.float64: torch.float32, torch.int16: torch.int32, torch.int8: torch.int32}
ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def device_context(device):
    """The library context for a torch device."""
    if device.type == "cpu":
        return _runtime.context("cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        ctx = _runtime.context("cuda", index)
        if not getattr(ctx, "torch_allocator", None):
            _install_torch_allocator(ctx, index)
        return ctx
    raise RuntimeError(f"flexattn: tensors on device '{device}' are not supported; "
                       "use CPU or CUDA tensors")


# Work space the library took from torch's caching allocator (a count, for
# the tests).
workspace_allocations = 0


def _install_torch_allocator(ctx, index):
    """Makes the CUDA backend take its per-call work space (the backward's
    delta and dQ accumulator, decode pieces) from torch's caching allocator,
    on the stream the call runs on, so that it does not hold memory torch
    could reuse. The library frees right after queuing its work; torch's
    allocator reuses a block only in that stream's order."""
    def alloc(_user, nbytes, stream):
        global workspace_allocations
        try:
            ptr = torch.cuda.caching_allocator_alloc(nbytes, device=index, stream=stream or 0)
        except Exception:  # cannot cross the C frames: the call fails with MemoryError
            return None
        workspace_allocations += 1
        return ptr

    def free(_user, ptr, _stream):
        torch.cuda.caching_allocator_delete(ptr)

    with ctx.lock:
        if getattr(ctx, "torch_allocator", None):
            return
        table = L.DeviceAllocator(L.ALLOC_FN(alloc), L.FREE_FN(free), None)
        ctx.check(L.lib.flex_context_set_allocator(ctx.handle, ctypes.byref(table)))
        ctx.torch_allocator = table  # the callbacks live as long as the context


def _device_code(device):
    return (L.DEVICE_CUDA, device.index or 0) if device.type == "cuda" else (L.DEVICE_CPU, 0)


def view(t):
    """A flex_tensor over t's memory (sizes and strides as they are)."""
    code, index = _device_code(t.device)
    return L.make_tensor(t.data_ptr(), DTYPES[t.dtype], t.shape, t.stride(), code, index)


def lse_view(lse):
    """The (B, H, L) f32 log-sum-exp as the 4-D view the library takes."""
    code, index = _device_code(lse.device)
    B, H, S = lse.shape
    s = lse.stride()
    return L.make_tensor(lse.data_ptr(), L.F32, (B, H, S, 1), (s[0], s[1], s[2], 1), code, index)


def buffer_tensor(t):
    """The tensor whose memory a buffer binding reads: t itself, or a copy
    for dtypes the library does not read (float64 and small ints), with 0-d
    tensors seen as 1-D of one element."""
    if t.dtype in BUFFER_COPIES:
        t = t.to(BUFFER_COPIES[t.dtype])
    return t.reshape(1) if t.dim() == 0 else t


def buffer_views(tensors):
    """(views, tensors they read): keep the second list alive while bound."""
    read = [buffer_tensor(t.detach()) for t in tensors]
    return [view(t) for t in read], read
