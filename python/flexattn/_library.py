"""ctypes bindings of libflexattn (include/flexattn.h), and nothing else.

This module owns the loaded library and the C declarations. It knows no
torch and no numpy: the rest of the package builds flex_tensor views from
their arrays. Every C call that returns a flex_status goes through `check`,
which turns a failure into a Python exception carrying the library's message.
"""

import ctypes
import ctypes.util
import os
import pathlib
import struct

FLEX_OK = 0
ERR_UNSUPPORTED = 5
ERR_OUT_OF_MEMORY = 7

DEVICE_CPU, DEVICE_CUDA = 1, 2
F32, F16, BF16, I32, I64, U8, BOOL = range(7)
DTYPE_NAMES = {F32: "f32", F16: "f16", BF16: "bf16", I32: "i32", I64: "i64", U8: "u8", BOOL: "bool"}
MOD_MASK, MOD_SCORE = 0, 1
BLOCK_EMPTY, BLOCK_PARTIAL, BLOCK_FULL = 0, 1, 2


class FlexError(RuntimeError):
    """A call into libflexattn failed. `status` is the flex_status name
    ("ERR_SHAPE", ...); the message is the library's own text."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class FlexUnsupportedError(FlexError, NotImplementedError):
    """The backend cannot do this valid request (FLEX_ERR_UNSUPPORTED)."""


class FlexModError(FlexError, ValueError):
    """Mod text that does not parse, type-check or name things right."""


class FlexBoundsError(FlexError, IndexError):
    """A mod read a buffer outside its sizes."""


class FlexArgumentError(FlexError, ValueError):
    """An argument the library refused (shape, dtype, value)."""


class FlexOverflowError(FlexError, OverflowError):
    """A size, stride or byte count beyond the address space (FLEX_ERR_OVERFLOW)."""


_ERROR_CLASSES = {
    1: FlexArgumentError, 3: FlexArgumentError, 4: FlexArgumentError, 5: FlexUnsupportedError,
    8: FlexModError, 9: FlexModError, 10: FlexModError, 11: FlexBoundsError, 17: FlexOverflowError,
}


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("ndim", ctypes.c_int),
                ("sizes", ctypes.c_int64 * 4), ("strides", ctypes.c_int64 * 4),
                ("device", ctypes.c_int), ("device_index", ctypes.c_int)]


class Param(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("is_float", ctypes.c_int), ("value", ctypes.c_double)]


class BufferDecl(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("dtype", ctypes.c_int), ("ndim", ctypes.c_int)]


class ModDesc(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("text", ctypes.c_char_p),
                ("params", ctypes.POINTER(Param)), ("num_params", ctypes.c_int),
                ("buffers", ctypes.POINTER(BufferDecl)), ("num_buffers", ctypes.c_int)]


class AttentionOptions(ctypes.Structure):
    _fields_ = [("scale", ctypes.c_float), ("mask_mod", ctypes.c_void_p),
                ("stream", ctypes.c_void_p), ("q_tile", ctypes.c_int), ("kv_tile", ctypes.c_int),
                ("kv_splits", ctypes.c_int),
                # decode and serving (NULL: not used); the library reads them,
                # so the struct must end where the C one does
                ("q_offsets", ctypes.c_void_p), ("kv_lengths", ctypes.c_void_p),
                ("page_table", ctypes.c_void_p),
                # the backward: bit-identical gradients every run (0 or 1)
                ("deterministic", ctypes.c_int)]


class BufferGrad(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("grad", Tensor)]


ALLOC_FN = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
FREE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)


class DeviceAllocator(ctypes.Structure):
    """flex_device_allocator: where a GPU backend takes per-call work space."""
    _fields_ = [("alloc", ALLOC_FN), ("free", FREE_FN), ("user", ctypes.c_void_p)]


class BlockMaskShape(ctypes.Structure):
    _fields_ = [("B", ctypes.c_int64), ("H", ctypes.c_int64), ("q_len", ctypes.c_int64),
                ("kv_len", ctypes.c_int64), ("q_block", ctypes.c_int), ("kv_block", ctypes.c_int),
                ("num_q_blocks", ctypes.c_int64), ("num_kv_blocks", ctypes.c_int64),
                ("num_full", ctypes.c_int64), ("num_partial", ctypes.c_int64)]


class BackendInfo(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("built_in", ctypes.c_int), ("usable", ctypes.c_int),
                ("score", ctypes.c_int), ("reason", ctypes.c_char * 256)]


def _candidates():
    """Where libflexattn.so may be, most specific first: FLEXATTN_LIBRARY, the
    copy installed inside the package, a build folder of the source tree the
    package sits in (development without installing), then the system."""
    env = os.environ.get("FLEXATTN_LIBRARY")
    if env:
        yield env
        return
    here = pathlib.Path(__file__).resolve().parent
    yield str(here / "_lib" / "libflexattn.so")
    root = here.parent.parent
    if (root / "include" / "flexattn.h").is_file():
        # plain builds only: a sanitizer build cannot be loaded into Python
        for build in ("build-py/lib", "build", "build-test"):
            yield str(root / build / "libflexattn.so")
    found = ctypes.util.find_library("flexattn")
    if found:
        yield found


def _load():
    tried = []
    for path in _candidates():
        if os.path.sep in path and not os.path.exists(path):
            tried.append(path)
            continue
        try:
            return ctypes.CDLL(path), path
        except OSError as e:
            tried.append(f"{path} ({e})")
    raise ImportError("libflexattn.so was not found; install the package with pip (which builds "
                      "it) or set FLEXATTN_LIBRARY. Tried: " + "; ".join(tried or ["nothing"]))


lib, library_path = _load()

_vp, _i, _i64, _cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_char_p
_PT = ctypes.POINTER(Tensor)
_PROTOTYPES = {
    "flex_version": (_cp, []),
    "flex_status_name": (_cp, [_i]),
    "flex_context_create": (_i, [_cp, ctypes.POINTER(_vp)]),
    "flex_context_destroy": (None, [_vp]),
    "flex_context_backend": (_cp, [_vp]),
    "flex_context_set_allocator": (_i, [_vp, ctypes.POINTER(DeviceAllocator)]),
    "flex_context_device_name": (_cp, [_vp]),
    "flex_error_message": (_cp, [_vp]),
    "flex_backend_count": (_i, []),
    "flex_backend_get_info": (_i, [_i, ctypes.POINTER(BackendInfo)]),
    "flex_synchronize": (_i, [_vp]),
    "flex_mod_compile": (_i, [_vp, ctypes.POINTER(ModDesc), ctypes.POINTER(_vp)]),
    "flex_mod_destroy": (None, [_vp]),
    "flex_mod_bind_buffer": (_i, [_vp, _vp, _cp, _PT]),
    "flex_mod_canonical_text": (_cp, [_vp]),
    "flex_mod_hash": (ctypes.c_uint64, [_vp]),
    "flex_block_mask_create": (_i, [_vp, _vp, _i64, _i64, _i64, _i64, _i, _i, ctypes.POINTER(_vp)]),
    "flex_block_mask_from_kv_blocks": (_i, [_vp, _vp, _i64, _i64, _i64, _i64, _i, _i, _vp, _vp,
                                            _vp, _vp, ctypes.POINTER(_vp)]),
    "flex_block_mask_and": (_i, [_vp, _vp, _vp, ctypes.POINTER(_vp)]),
    "flex_block_mask_or": (_i, [_vp, _vp, _vp, ctypes.POINTER(_vp)]),
    "flex_block_mask_destroy": (None, [_vp]),
    "flex_block_mask_get_shape": (_i, [_vp, ctypes.POINTER(BlockMaskShape)]),
    "flex_block_mask_sparsity": (ctypes.c_double, [_vp]),
    "flex_block_mask_to_dense": (_i, [_vp, _vp]),
    "flex_block_mask_format": (ctypes.c_size_t, [_vp, _i64, _i64, _i, _cp, ctypes.c_size_t]),
    "flex_attention": (_i, [_vp, _PT, _PT, _PT, _vp, _vp, ctypes.POINTER(AttentionOptions), _PT,
                            _PT]),
    "flex_attention_backward": (_i, [_vp, _PT, _PT, _PT, _PT, _PT, _PT, _vp, _vp,
                                     ctypes.POINTER(AttentionOptions), _PT, _PT, _PT,
                                     ctypes.POINTER(BufferGrad), _i]),
}
for _name, (_res, _args) in _PROTOTYPES.items():
    _fn = getattr(lib, _name)
    _fn.restype, _fn.argtypes = _res, _args


def version():
    return lib.flex_version().decode()


def error(status, ctx=None):
    """The exception for a failed call: the library's message on ctx (or the
    per-thread one for ctx None), in the class that fits the status."""
    message = (lib.flex_error_message(ctx) or b"").decode(errors="replace")
    # The library names its own codes, so a code added in C needs no table here.
    name = lib.flex_status_name(status).decode()
    cls = _ERROR_CLASSES.get(status, FlexError)
    return cls(name, f"flexattn: {message}" if message else f"flexattn: {name}")


def check(status, ctx=None):
    if status != FLEX_OK:
        raise error(status, ctx)


# flex_tensor's bytes, packed in one call: a view is made for every tensor of
# every call, and setting the fields one by one costs twice as much host time.
_TENSOR_BYTES = struct.Struct("=Qii4q4qii")
_PACKED_VIEWS = (_TENSOR_BYTES.size == ctypes.sizeof(Tensor) and
                 ctypes.sizeof(ctypes.c_void_p) == 8)


def make_tensor(data_ptr, dtype, sizes, strides, device=DEVICE_CPU, device_index=0):
    """A flex_tensor view (the caller keeps the memory alive for the call)."""
    n = len(sizes)
    if _PACKED_VIEWS and n <= 4:
        pad = (0,) * (4 - n)
        return Tensor.from_buffer_copy(_TENSOR_BYTES.pack(
            data_ptr or 0, dtype, n, *sizes, *pad, *strides, *pad, device, device_index))
    t = Tensor()
    t.data = data_ptr
    t.dtype = dtype
    t.ndim = len(sizes)
    for d, (size, stride) in enumerate(zip(sizes, strides)):
        t.sizes[d] = int(size)
        t.strides[d] = int(stride)
    t.device = device
    t.device_index = device_index
    return t


def backends():
    """[(name, built_in, usable, reason)] for every backend the library knows."""
    out = []
    for i in range(lib.flex_backend_count()):
        info = BackendInfo()
        check(lib.flex_backend_get_info(i, ctypes.byref(info)))
        out.append((info.name.decode(), bool(info.built_in), bool(info.usable),
                    info.reason.decode(errors="replace")))
    return out
