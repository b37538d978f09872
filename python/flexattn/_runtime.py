"""Library objects with Python lifetimes: contexts, compiled mods, block masks.

One `Context` per device ("cpu", "cuda:0", ...) lives for the process; a lock
per context serialises the calls on it (a context holds its last error
message and its caches). `Mod` and `CBlockMask` own one C handle each and
free it when collected. Compiled mods are cached by their spec (kind, buffer
declarations, text), so a mod translated again each step compiles once.
"""

import collections
import ctypes
import threading

from . import _library as L

_contexts = {}
_contexts_lock = threading.Lock()


class Context:
    """A flex_context for one device, owned by this module for the process."""

    def __init__(self, spec):
        handle = ctypes.c_void_p()
        L.check(L.lib.flex_context_create(spec.encode(), ctypes.byref(handle)))
        self.handle = handle
        self.spec = spec
        self.lock = threading.RLock()
        self.backend = L.lib.flex_context_backend(handle).decode()
        self.device_type = L.DEVICE_CUDA if self.backend == "cuda" else L.DEVICE_CPU
        self.device_index = int(spec.split(":")[1]) if ":" in spec else 0

    def check(self, status):
        if status != L.FLEX_OK:
            raise L.error(status, self.handle)


def context(device_type="cpu", index=0):
    """The process's context for a device: "cpu", or "cuda" with an index."""
    spec = "cpu" if device_type == "cpu" else f"{device_type}:{index}"
    with _contexts_lock:
        ctx = _contexts.get(spec)
        if ctx is None:
            ctx = _contexts[spec] = Context(spec)
        return ctx


class Mod:
    """A compiled flex_mod from a spec (see _trace.Traced.spec)."""

    def __init__(self, kind, text, buffers, ctx=None, params=()):
        self._param_names = [n.encode() for n, _ in params]
        c_params = (L.Param * max(1, len(params)))()
        for i, (name, value) in enumerate(params):
            is_float = isinstance(value, float)
            if not is_float and not isinstance(value, int):
                raise TypeError(f"param {name!r} must be an int or a float, not "
                                f"{type(value).__name__}")
            c_params[i].name = self._param_names[i]
            c_params[i].is_float = int(is_float)
            c_params[i].value = float(value)
        decls = (L.BufferDecl * max(1, len(buffers)))()
        self._names = [n.encode() for n, _, _ in buffers]
        for i, (name, dtype, ndim) in enumerate(buffers):
            decls[i].name, decls[i].dtype, decls[i].ndim = self._names[i], dtype, ndim
        self._text = text.encode()
        desc = L.ModDesc(kind, self._text, c_params if params else None, len(params),
                         decls if buffers else None, len(buffers))
        handle = ctypes.c_void_p()
        status = L.lib.flex_mod_compile(ctx.handle if ctx else None, ctypes.byref(desc),
                                        ctypes.byref(handle))
        if status != L.FLEX_OK:
            raise L.error(status, ctx.handle if ctx else None)
        self.handle = handle
        self.kind = kind
        self.buffers = list(buffers)
        self._lib = L.lib

    @property
    def canonical_text(self):
        return L.lib.flex_mod_canonical_text(self.handle).decode()

    def bind(self, ctx, views):
        """Binds flex_tensor views, in declaration order. The caller keeps the
        memory alive and unchanged while the mod may read it."""
        for (name, _, _), view in zip(self.buffers, views):
            ctx.check(L.lib.flex_mod_bind_buffer(ctx.handle, self.handle, name.encode(),
                                                 ctypes.byref(view)))

    def __del__(self):
        handle = getattr(self, "handle", None)
        if handle:
            self._lib.flex_mod_destroy(handle)
            self.handle = None


_mod_cache = collections.OrderedDict()
_mod_cache_lock = threading.Lock()
_MOD_CACHE_SIZE = 64


def compiled_mod(kind, text, buffers, ctx=None, shared=True):
    """The compiled mod of a spec: from the cache when shared (the caller binds
    its buffers before each use, under the context's lock), else a new one that
    the caller owns (block masks keep their mask mod bound for their life)."""
    if not shared:
        return Mod(kind, text, buffers, ctx)
    key = (kind, text, tuple(buffers))
    with _mod_cache_lock:
        mod = _mod_cache.get(key)
        if mod is not None:
            _mod_cache.move_to_end(key)
            return mod
    mod = Mod(kind, text, buffers, ctx)
    with _mod_cache_lock:
        _mod_cache[key] = mod
        while len(_mod_cache) > _MOD_CACHE_SIZE:
            _mod_cache.popitem(last=False)
    return mod


class CBlockMask:
    """A flex_block_mask on one context. Keeps its mask mod (and, through the
    owner's references, the mod's buffers) alive, as the C API requires."""

    def __init__(self, ctx, handle, mask_mod, keep_alive=()):
        self.ctx, self.handle, self.mask_mod = ctx, handle, mask_mod
        self.keep_alive = keep_alive
        self._lib = L.lib

    @classmethod
    def create(cls, ctx, mask_mod, B, H, q_len, kv_len, q_block, kv_block, keep_alive=()):
        handle = ctypes.c_void_p()
        with ctx.lock:
            ctx.check(L.lib.flex_block_mask_create(ctx.handle, mask_mod.handle, B, H, q_len, kv_len,
                                                   q_block, kv_block, ctypes.byref(handle)))
        return cls(ctx, handle, mask_mod, keep_alive)

    @classmethod
    def from_kv_blocks(cls, ctx, mask_mod, B, H, q_len, kv_len, q_block, kv_block,
                       kv_num_blocks, kv_indices, full_num_blocks, full_indices, keep_alive=()):
        """The four arrays are host int32 contiguous arrays given as addresses
        (full_* may be None)."""
        handle = ctypes.c_void_p()
        with ctx.lock:
            ctx.check(L.lib.flex_block_mask_from_kv_blocks(
                ctx.handle, mask_mod.handle if mask_mod else None, B, H, q_len, kv_len, q_block,
                kv_block, kv_num_blocks, kv_indices, full_num_blocks, full_indices,
                ctypes.byref(handle)))
        return cls(ctx, handle, mask_mod, keep_alive)

    def shape(self):
        s = L.BlockMaskShape()
        L.check(L.lib.flex_block_mask_get_shape(self.handle, ctypes.byref(s)))
        return s

    def sparsity(self):
        return L.lib.flex_block_mask_sparsity(self.handle)

    def to_dense(self, out_address):
        L.check(L.lib.flex_block_mask_to_dense(self.handle, out_address))

    def format(self, b=0, h=0, max_cells=0):
        need = L.lib.flex_block_mask_format(self.handle, b, h, max_cells, None, 0)
        buf = ctypes.create_string_buffer(need + 1)
        L.lib.flex_block_mask_format(self.handle, b, h, max_cells, buf, need + 1)
        return buf.value.decode("utf-8", errors="replace")

    def __del__(self):
        handle = getattr(self, "handle", None)
        if handle:
            self._lib.flex_block_mask_destroy(handle)
            self.handle = None
