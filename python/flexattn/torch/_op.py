"""The torch.library custom ops `flexattn::attention` and
`flexattn::attention_backward`, their fake (meta) implementations and the
autograd formula that joins them.

Everything an op needs crosses its boundary as tensors, ints, floats and
strings, so that torch.compile can put it in a graph: a mod is its spec
string (see _trace.Traced.spec) plus the list of captured tensors it reads; a
block mask is its kv-block tensors (torch's layout) plus its mask mod. The
library objects behind them (compiled mods, C block masks) are found in
caches here, keyed by those values.
"""

import collections
import ctypes
import threading
import warnings
from typing import List, Tuple

import torch

from .. import _library as L
from .. import _runtime
from . import _views

# ----------------------------------------------------------------------------
# Mods and block masks behind the op's arguments


def parse_spec(spec):
    """(kind, text, [(name, dtype, ndim)]) of a spec string."""
    kind, decls, text = spec.split("|", 2)
    buffers = []
    for d in filter(None, decls.split(";")):
        name, dtype, ndim = d.split(":")
        buffers.append((name, int(dtype), int(ndim)))
    return int(kind), text, buffers


def _bound_mod(ctx, spec, tensors, keep):
    """The shared compiled mod of spec with tensors bound (call under
    ctx.lock; the memory read is appended to keep)."""
    if not spec:
        return None
    kind, text, buffers = parse_spec(spec)
    mod = _runtime.compiled_mod(kind, text, buffers, ctx)
    views, read = _views.buffer_views(tensors)
    keep.extend(read)
    mod.bind(ctx, views)
    return mod


_masks = collections.OrderedDict()
_masks_lock = threading.Lock()
_MASK_CACHE_SIZE = 16


def _mask_key(ctx, mask_tensors, mask_buffers, mask_spec, info):
    # The cache keeps the tensors alive, so an address cannot be reused by
    # other data while its entry exists; the version counter sees in-place
    # changes.
    ids = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in
                list(mask_tensors) + list(mask_buffers))
    return (ctx.spec, mask_spec, tuple(info), ids)


def register_mask(ctx, mask_tensors, mask_buffers, mask_spec, info, cmask):
    """Adds a C block mask built elsewhere (create_block_mask) to the cache."""
    key = _mask_key(ctx, mask_tensors, mask_buffers, mask_spec, info)
    cmask.keep_alive = (list(mask_tensors), list(mask_buffers), cmask.keep_alive)
    with _masks_lock:
        _masks[key] = cmask
        while len(_masks) > _MASK_CACHE_SIZE:
            _masks.popitem(last=False)


def c_block_mask(ctx, mask_tensors, mask_buffers, mask_spec, info):
    """The C block mask on ctx for these block-mask tensors, from the cache or
    built from the kv-block lists (with the mask mod bound to its buffers for
    the mask's life)."""
    if not mask_tensors:
        return None
    key = _mask_key(ctx, mask_tensors, mask_buffers, mask_spec, info)
    with _masks_lock:
        found = _masks.get(key)
        if found is not None:
            _masks.move_to_end(key)
            return found
    B, H, q_len, kv_len, q_block, kv_block = info
    mod, read = None, []
    if mask_spec:
        kind, text, buffers = parse_spec(mask_spec)
        mod = _runtime.compiled_mod(kind, text, buffers, ctx, shared=False)
        views, read = _views.buffer_views(mask_buffers)
        with ctx.lock:
            mod.bind(ctx, views)
    host = [t.detach().to(device="cpu", dtype=torch.int32).contiguous() for t in mask_tensors]
    kv_num, kv_idx = host[0], host[1]
    full_num, full_idx = (host[2], host[3]) if len(host) == 4 else (None, None)
    cmask = _runtime.CBlockMask.from_kv_blocks(
        ctx, mod, B, H, q_len, kv_len, q_block, kv_block, kv_num.data_ptr(), kv_idx.data_ptr(),
        full_num.data_ptr() if full_num is not None else None,
        full_idx.data_ptr() if full_idx is not None else None, keep_alive=read)
    register_mask(ctx, mask_tensors, mask_buffers, mask_spec, info, cmask)
    return cmask


def _options(ctx, scale, kernel, device):
    opts = L.AttentionOptions()
    opts.scale = scale
    if kernel:
        opts.q_tile, opts.kv_tile, opts.kv_splits = kernel
    if device.type == "cuda":
        opts.stream = torch.cuda.current_stream(device).cuda_stream
    return opts


def _deterministic(device, buffer_names):
    """opts->deterministic for a backward on device that wants the gradients
    of the named buffers: 1 while torch.use_deterministic_algorithms(True)
    is in force (read when the backward runs, as torch's own kernels read
    it), else 0. The library's CUDA backward has no deterministic buffer
    gradients: asked for, they raise RuntimeError as torch's operations
    without a deterministic implementation do, or, with warn_only=True,
    warn and run in the default mode. The CPU backward is deterministic
    either way."""
    if not torch.are_deterministic_algorithms_enabled():
        return 0
    if device.type == "cpu" or not buffer_names:
        return 1
    caller = ("flexattn's backward on %s with gradients of the captured tensor%s %s"
              % (device.type, "s" if len(buffer_names) > 1 else "",
                 ", ".join(repr(n) for n in buffer_names)))
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(f"{caller} does not have a deterministic implementation, but you set "
                      f"'torch.use_deterministic_algorithms(True, warn_only=True)'; it runs "
                      f"in its default mode, whose gradients may differ in the last bits "
                      f"from run to run", stacklevel=3)
        return 0
    raise RuntimeError(f"{caller} does not have a deterministic implementation, but you set "
                       f"'torch.use_deterministic_algorithms(True)'. You can turn off "
                       f"determinism just for this operation, or you can use the "
                       f"'warn_only=True' option, if that's acceptable for your application; "
                       f"or run it on CPU tensors, whose backward is deterministic.")


def _cuda_input(t):
    """GPU backends need the last dimension contiguous."""
    return t if t.device.type == "cpu" or t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------
# Forward


@torch.library.custom_op("flexattn::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_buffers: List[torch.Tensor],
              score_spec: str, mask_tensors: List[torch.Tensor], mask_buffers: List[torch.Tensor],
              mask_spec: str, mask_info: List[int], scale: float,
              kernel: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _cuda_input(q), _cuda_input(k), _cuda_input(v)
    B, Hq, Lq, _ = q.shape
    out = q.new_empty((B, Hq, Lq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    ctx = _views.device_context(q.device)
    cmask = c_block_mask(ctx, mask_tensors, mask_buffers, mask_spec, mask_info)
    keep = []
    tq, tk, tv, to = (_views.view(t) for t in (q, k, v, out))
    tl = _views.lse_view(lse)
    with ctx.lock:
        mod = _bound_mod(ctx, score_spec, score_buffers, keep)
        opts = _options(ctx, scale, kernel, q.device)
        ctx.check(L.lib.flex_attention(ctx.handle, ctypes.byref(tq), ctypes.byref(tk),
                                       ctypes.byref(tv), mod.handle if mod else None,
                                       cmask.handle if cmask else None, ctypes.byref(opts),
                                       ctypes.byref(to), ctypes.byref(tl)))
    return out, lse


@attention.register_fake
def _attention_fake(q, k, v, score_buffers, score_spec, mask_tensors, mask_buffers, mask_spec,
                    mask_info, scale, kernel):
    B, Hq, Lq, _ = q.shape
    return (q.new_empty((B, Hq, Lq, v.shape[-1])),
            q.new_empty((B, Hq, Lq), dtype=torch.float32))


# ----------------------------------------------------------------------------
# Backward


@torch.library.custom_op("flexattn::attention_backward", mutates_args=())
def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, grad_out: torch.Tensor,
                       score_buffers: List[torch.Tensor], score_spec: str,
                       mask_tensors: List[torch.Tensor], mask_buffers: List[torch.Tensor],
                       mask_spec: str, mask_info: List[int], scale: float, kernel: List[int],
                       buffer_grads_wanted: List[int]) -> List[torch.Tensor]:
    q, k, v, out, grad_out = (_cuda_input(t) for t in (q, k, v, out, grad_out))
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    ctx = _views.device_context(q.device)
    cmask = c_block_mask(ctx, mask_tensors, mask_buffers, mask_spec, mask_info)
    keep = []
    views = [_views.view(t) for t in (q, k, v, out, grad_out, dq, dk, dv)]
    tl = _views.lse_view(lse)
    grads = []
    if score_spec:
        _, _, decls = parse_spec(score_spec)
        for (name, _, _), buf, wanted in zip(decls, score_buffers, buffer_grads_wanted):
            grads.append((name, torch.zeros(_views.buffer_tensor(buf.detach()).shape,
                                            dtype=torch.float32, device=buf.device)
                          if wanted else None))
    wanted = [(name, g) for name, g in grads if g is not None]
    deterministic = _deterministic(q.device, [name for name, _ in wanted])
    c_grads = (L.BufferGrad * max(1, len(wanted)))()
    names = [name.encode() for name, _ in wanted]
    for i, (name, g) in enumerate(wanted):
        c_grads[i].name = names[i]
        c_grads[i].grad = _views.view(g)
    with ctx.lock:
        mod = _bound_mod(ctx, score_spec, score_buffers, keep)
        opts = _options(ctx, scale, kernel, q.device)
        opts.deterministic = deterministic
        tq, tk, tv, to, tdo, tdq, tdk, tdv = views
        status = L.lib.flex_attention_backward(
            ctx.handle, ctypes.byref(tq), ctypes.byref(tk), ctypes.byref(tv), ctypes.byref(to),
            ctypes.byref(tdo), ctypes.byref(tl), mod.handle if mod else None,
            cmask.handle if cmask else None, ctypes.byref(opts), ctypes.byref(tdq),
            ctypes.byref(tdk), ctypes.byref(tdv), c_grads if wanted else None, len(wanted))
        if status == L.ERR_UNSUPPORTED and q.device.type != "cpu":
            message = L.lib.flex_error_message(ctx.handle).decode(errors="replace")
            raise NotImplementedError(
                f"flexattn: the backward pass is not available on {q.device} with this build "
                f"of the library ({message}); gradients work on CPU tensors")
        ctx.check(status)
    result = [dq, dk, dv]
    for (_, g), buf in zip(grads, score_buffers):
        result.append(g.reshape(buf.shape).to(buf.dtype) if g is not None
                      else buf.new_empty((0,)))
    return result


@attention_backward.register_fake
def _attention_backward_fake(q, k, v, out, lse, grad_out, score_buffers, score_spec, mask_tensors,
                             mask_buffers, mask_spec, mask_info, scale, kernel,
                             buffer_grads_wanted):
    # contiguous, as the real implementation returns them
    result = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]
    for buf, wanted in zip(score_buffers, buffer_grads_wanted):
        result.append(buf.new_empty(buf.shape) if wanted else buf.new_empty((0,)))
    return result


# ----------------------------------------------------------------------------
# Autograd


def _setup_context(ctx, inputs, output):
    (q, k, v, score_buffers, score_spec, mask_tensors, mask_buffers, mask_spec, mask_info, scale,
     kernel) = inputs
    out, lse = output
    ctx.wanted = [int(b.requires_grad and b.is_floating_point()) for b in score_buffers]
    ctx.num_score = len(score_buffers)
    ctx.num_mask = (len(mask_tensors), len(mask_buffers))
    ctx.args = (score_spec, mask_spec, list(mask_info), scale, list(kernel))
    # The gradient structure autograd expects: one entry per input, a list
    # for each list of tensors.
    ctx.structure = [len(a) if isinstance(a, (list, tuple)) and
                     (not a or isinstance(a[0], torch.Tensor)) else None for a in inputs]
    ctx.save_for_backward(q, k, v, out, lse, *score_buffers, *mask_tensors, *mask_buffers)


def _traced(t):
    """Whether t is a tracing stand-in (dynamo, or AOT autograd tracing the
    backward with functional or fake tensors), whose values cannot be read;
    torch.compiler.is_compiling() is False during the latter."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _backward(ctx, grad_out, grad_lse):
    saved = ctx.saved_tensors
    q, k, v, out, lse = saved[:5]
    rest = saved[5:]
    n_s, (n_t, n_b) = ctx.num_score, ctx.num_mask
    score_buffers = list(rest[:n_s])
    mask_tensors = list(rest[n_s:n_s + n_t])
    mask_buffers = list(rest[n_s + n_t:n_s + n_t + n_b])
    score_spec, mask_spec, mask_info, scale, kernel = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is not None and not _traced(grad_lse) and bool((grad_lse != 0).any()):
        raise NotImplementedError("flexattn: gradients through the returned lse are not "
                                  "supported; use the lse outside the graph (lse.detach())")
    grads = attention_backward(q, k, v, out, lse, grad_out, score_buffers, score_spec,
                               mask_tensors, mask_buffers, mask_spec, mask_info, scale, kernel,
                               ctx.wanted)
    dq, dk, dv = grads[:3]
    buffer_grads = [g if w else None for g, w in zip(grads[3:], ctx.wanted)]
    result = [None if n is None else [None] * n for n in ctx.structure]
    result[:4] = [dq, dk, dv, buffer_grads]
    return tuple(result)


attention.register_autograd(_backward, setup_context=_setup_context)
