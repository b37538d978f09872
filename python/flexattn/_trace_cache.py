"""Translations of mod callables, kept while what they were made from is the same.

An eager call of flex_attention with a Python score mod would translate the
mod on every call (trace_mod calls it on symbols), which costs more host time
than a short GPU kernel takes. A translation depends on the function's code
and on the values it reads: closure cells, the globals and builtins its code
names, and default arguments. `cached_trace(fn, kind)` keys a translation on
exactly these, so a closure made anew each step with the same captured
values (a mod factory called in forward()) finds the translation of the
last one.

What a key may hold is chosen so that a stale translation cannot be
returned:
- numbers, strings, None, torch dtypes and devices: by value (and type, so
  that 1, 1.0 and True differ);
- tensors: by identity, data pointer, version counter (bumped by every
  in-place change, so a value the mod read with .item() is read again),
  shape, dtype and device;
- functions: their code object and, recursively, their own environment;
- tuples: their items; modules of torch, math, numpy and operator, builtin
  functions: by identity.
Anything else (a list, a dict, an object with attributes, a module of the
user's whose attributes may change, a bound method, a depth over 4) makes the
mod uncached: it is translated on every call, as without the cache.

The cache holds tensors only weakly: an entry whose tensors were freed is a
miss (and an id reused by a new tensor cannot match it), and a large captured
tensor is not kept alive by the cache.
"""

import builtins
import collections
import sys
import threading
import types
import weakref

from ._trace import trace_mod, Traced

_CACHE_SIZE = 64
_MAX_DEPTH = 4
_LIBRARY_MODULES = {"torch", "math", "numpy", "operator", "builtins", "cmath"}
_VALUE_TYPES = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis))

# key -> (kind, text, buffers, [weakref to each buffer], [weakref to each tensor of the key])
_entries = collections.OrderedDict()
_lock = threading.Lock()


class _Uncacheable(Exception):
    pass


def _torch_value_types():
    torch = sys.modules.get("torch")
    return (torch.dtype, torch.device) if torch is not None else ()


def _is_torch_tensor(value):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


_code_names = {}  # code object -> the sorted global names it and its nested code may read


def _collect_names(code, into):
    into.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _collect_names(const, into)


def _names(code):
    names = _code_names.get(code)
    if names is None:
        found = set()
        _collect_names(code, found)
        names = tuple(sorted(found))
        if len(_code_names) >= 1024:
            _code_names.clear()
        _code_names[code] = names
    return names


def _value_key(value, tensors, depth):
    kind = type(value)
    if kind in _VALUE_TYPES or isinstance(value, _torch_value_types()):
        return (kind, value)
    if _is_torch_tensor(value):
        tensors.append(value)
        return ("tensor", id(value), value.data_ptr(), value._version, tuple(value.shape),
                value.dtype, value.device)
    if kind is types.FunctionType:
        return _function_key(value, tensors, depth + 1)
    if kind is types.BuiltinFunctionType:
        return ("builtin", id(value))
    if kind is types.ModuleType:
        if value.__name__.split(".")[0] not in _LIBRARY_MODULES:
            raise _Uncacheable
        return ("module", id(value))
    if kind is tuple:
        return ("tuple",) + tuple(_value_key(v, tensors, depth + 1) for v in value)
    raise _Uncacheable


def _function_key(fn, tensors, depth):
    if depth > _MAX_DEPTH:
        raise _Uncacheable
    code = fn.__code__
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(_value_key(cell.cell_contents, tensors, depth))
        except ValueError:  # an empty cell
            cells.append(("empty",))
    found = []
    g = fn.__globals__
    for name in _names(code):
        if name in g:
            found.append((name, _value_key(g[name], tensors, depth)))
        elif hasattr(builtins, name):  # abs, min, float: by identity
            found.append((name, ("builtin", id(getattr(builtins, name)))))
    defaults = tuple(_value_key(d, tensors, depth) for d in fn.__defaults__ or ())
    kwdefaults = tuple((k, _value_key(v, tensors, depth))
                       for k, v in sorted((fn.__kwdefaults__ or {}).items()))
    # code objects live as long as their functions; the key keeps it alive
    # so that its id is not reused while the entry exists
    return ("function", code, tuple(cells), tuple(found), defaults, kwdefaults)


def _key(fn, kind):
    """The cache key of fn, with the tensors it holds; None when fn reads
    something the key cannot describe."""
    if type(fn) is not types.FunctionType:
        return None, None
    tensors = []
    try:
        return (kind, _function_key(fn, tensors, 0)), tensors
    except _Uncacheable:
        return None, None
    except Exception:  # e.g. a fake tensor of a tracer, which has no data pointer
        return None, None


def cached_trace(fn, kind):
    """trace_mod(fn, kind), from the cache where fn and what it reads are
    unchanged since a translation was made. The Traced returned is the
    caller's; its tensors are the user's own objects."""
    key, key_tensors = _key(fn, kind)
    if key is not None:
        with _lock:
            entry = _entries.get(key)
            if entry is not None:
                _entries.move_to_end(key)
        # A key's tensors are named by id: alive, they are the same objects.
        if entry is not None and all(r() is not None for r in entry[4]):
            kind_, text, buffers, refs, _ = entry
            tensors = [r() for r in refs]
            if all(t is not None for t in tensors):
                return Traced(kind_, text, list(buffers), tensors)
    traced = trace_mod(fn, kind)
    if key is not None:
        try:
            refs = [weakref.ref(t) for t in traced.tensors]
            key_refs = [weakref.ref(t) for t in key_tensors]
        except TypeError:  # a tensor that cannot be weakly referenced
            return traced
        with _lock:
            _entries[key] = (traced.kind, traced.text, tuple(traced.buffers), refs, key_refs)
            while len(_entries) > _CACHE_SIZE:
                _entries.popitem(last=False)
    return traced


def clear():
    """Forgets every translation (tests)."""
    with _lock:
        _entries.clear()
