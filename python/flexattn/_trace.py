"""Turns a Python mod callable into mod text by calling it once on symbols.

`trace_mod(fn, kind)` calls `fn(score, b, h, q_idx, kv_idx)` (or the mask
signature) with `Sym` objects standing for the arguments. Each operation on a
Sym returns a new Sym that records the expression; what the function returns
is the mod. Python numbers become literals (as params do once folded), and
captured tensors that the function indexes become buffers: the result
(`Traced`) owns the mod text, the buffer declarations and references to the
captured tensors themselves (bound later without a copy).

Everything the mod language cannot express -- Python control flow on a
traced value, calls into math or numpy, slicing -- raises a TypeError that
names the construct and the line of the user's function.
"""

import dataclasses
import math
import os
import re
import sys
import types

from . import _library as L

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# Names a buffer may not take: the language's variables, aliases, keywords and
# functions, and the prefix of the lets the tracer writes.
_RESERVED = set("""score b h q kv batch head q_idx kv_idx let true false inf abs min max clamp
where exp exp2 log log2 sqrt rsqrt pow sin cos tan tanh tanh_approx sigmoid floor ceil float
int""".split())
_LET_PREFIX = "t_"

_UNARY_FLOAT = {"exp", "exp2", "log", "log2", "sqrt", "rsqrt", "sin", "cos", "tan", "tanh",
                "sigmoid"}


def _promote(*types_):
    if "float" in types_:
        return "float"
    return "int"


_internal_files = {}  # code file name -> whether it is this package's or torch's


def _internal(filename):
    internal = _internal_files.get(filename)
    if internal is None:
        path = os.path.abspath(filename)
        internal = path.startswith(_PACKAGE_DIR) or f"{os.sep}torch{os.sep}" in path
        _internal_files[filename] = internal
    return internal


def _user_location():
    """'file:line (in function): source' of the innermost frame outside this
    package and outside torch: the line of the user's mod that did it. (It
    runs on every translation that indexes a captured tensor: torch tries
    the index's __index__, whose TypeError it catches, before
    __torch_function__; hence the cache of file names.)"""
    frame = sys._getframe(1)
    while frame is not None:
        if not _internal(frame.f_code.co_filename):
            import linecache
            source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            where = f"{frame.f_code.co_filename}:{frame.f_lineno} (in {frame.f_code.co_name})"
            return f"{where}: {source}" if source else where
        frame = frame.f_back
    return "an unknown line"


def unsupported(construct, hint=""):
    message = f"flexattn cannot translate {construct} in a mod, at {_user_location()}"
    if hint:
        message += f"; {hint}"
    return TypeError(message)


class _Tracer:
    """The state of one translation: lets written so far, buffers found."""

    def __init__(self):
        self.lets = []
        self.buffers = []  # [Buffer]
        self.by_id = {}  # id(tensor) -> Buffer
        self.names = {}  # id(tensor) -> variable name in the user's code
        self.used_names = set()

    def bind(self, text, type_):
        """A Sym for `text`: leaves inline, every operation a let, so the text
        stays flat however deep the function's expression is."""
        name = f"{_LET_PREFIX}{len(self.lets)}"
        self.lets.append(f"let {name} = {text};")
        return Sym(self, name, type_)

    def buffer(self, tensor):
        buf = self.by_id.get(id(tensor))
        if buf is None:
            buf = Buffer(self, _buffer_name(self, tensor), tensor)
            self.by_id[id(tensor)] = buf
            self.buffers.append(buf)
        return buf


def _buffer_name(tracer, tensor):
    base = re.sub(r"[^A-Za-z0-9_]", "_", tracer.names.get(id(tensor), "buf")) or "buf"
    if base[0].isdigit() or base in _RESERVED or base.startswith(_LET_PREFIX):
        base = "buf_" + base
    name, n = base, 1
    while name in tracer.used_names:
        name, n = f"{base}_{n}", n + 1
    tracer.used_names.add(name)
    return name


def _literal(value):
    if isinstance(value, bool):
        return ("true" if value else "false"), "bool"
    if isinstance(value, int):
        if not -2**31 <= value < 2**31:
            raise unsupported(f"the integer {value}", "mod ints are 32-bit")
        return (str(value) if value >= 0 else f"({value})"), "int"
    if isinstance(value, float):
        if math.isnan(value):
            return "(0.0 / 0.0)", "float"
        if math.isinf(value):
            return ("inf" if value > 0 else "(-inf)"), "float"
        text = repr(value)
        if "e" not in text and "." not in text:
            text += ".0"
        return (text if value >= 0 else f"({text})"), "float"
    return None


def _dtype_code(tensor):
    """The flex dtype a captured tensor is read as, from torch or numpy."""
    name = str(tensor.dtype).replace("torch.", "")
    return {"float32": L.F32, "float16": L.F16, "bfloat16": L.BF16, "int32": L.I32,
            "int64": L.I64, "uint8": L.U8, "bool": L.BOOL,
            # read through a converted copy (see the op layer)
            "float64": L.F32, "int16": L.I32, "int8": L.I32, "uint16": L.I32,
            "uint32": L.I64}.get(name)


def _is_tensor(x):
    return hasattr(x, "dtype") and hasattr(x, "shape") and hasattr(x, "data_ptr")


class Buffer:
    """A captured tensor the mod reads; `tensor` is the user's own object."""

    def __init__(self, tracer, name, tensor):
        self.tracer, self.name, self.tensor = tracer, name, tensor
        self.dtype = _dtype_code(tensor)
        if self.dtype is None:
            raise unsupported(f"reading a captured tensor of dtype {tensor.dtype}")
        self.ndim = max(1, tensor.dim())
        self.scalar = tensor.dim() == 0

    @property
    def type(self):
        if self.dtype in (L.F32, L.F16, L.BF16):
            return "float"
        return "bool" if self.dtype == L.BOOL else "int"


class BufferRef:
    """A captured tensor indexed by fewer indices than it has dimensions."""

    def __init__(self, buffer, indices):
        self.buffer, self.indices = buffer, indices

    def __getitem__(self, index):
        return _index(self.buffer, self.indices, index)

    def __bool__(self):
        raise unsupported("a partly indexed tensor used as a truth value")


def _index(buffer, done, index):
    parts = list(index) if isinstance(index, tuple) else [index]
    tracer = buffer.tracer
    for part in parts:
        if part is None or part is Ellipsis or isinstance(part, slice):
            raise unsupported(f"indexing a captured tensor with {part!r}",
                              "index with one int expression per dimension")
        if isinstance(part, Sym):
            if part.type == "float":
                raise unsupported("a float index", "convert it with .int() or .long()")
            done = done + [part.text]
        elif isinstance(part, int):
            size = buffer.tensor.shape[len(done)] if len(done) < buffer.tensor.dim() else 1
            done = done + [str(part + size if part < 0 else part)]
        elif _is_tensor(part) and part.dim() == 0:
            done = done + [as_sym(tracer, part).text]
        else:
            raise unsupported(f"indexing a captured tensor with {type(part).__name__}")
    if len(done) > buffer.ndim:
        raise unsupported(f"{len(done)} indices into a tensor of {buffer.ndim} dimensions")
    if len(done) < buffer.ndim:
        return BufferRef(buffer, done)
    return tracer.bind(f"{buffer.name}[{', '.join(done)}]", buffer.type)


def as_sym(tracer, x):
    """A Sym for x: a Sym, a Python number, a 0-d captured tensor or a fully
    indexed BufferRef; anything else is a TypeError."""
    if isinstance(x, Sym):
        return x
    lit = _literal(x) if isinstance(x, (bool, int, float)) else None
    if lit is not None:
        return Sym(tracer, *lit)
    if _is_tensor(x):
        if x.numel() != 1:
            raise unsupported(f"a captured tensor of shape {tuple(x.shape)} used as a value",
                              "index it with the mod's variables")
        buf = tracer.buffer(x)
        return _index(buf, [], tuple(0 for _ in range(buf.ndim)))
    if isinstance(x, BufferRef):
        raise unsupported(f"tensor '{x.buffer.name}' indexed with {len(x.indices)} of its "
                          f"{x.buffer.ndim} dimensions")
    raise unsupported(f"a value of type {type(x).__name__}")


def _float_text(s):
    return s.text if s.type == "float" else f"float({s.text})"


class Sym:
    """A traced value: mod text of a leaf or a let, and its type
    ('int', 'float' or 'bool')."""

    __slots__ = ("tracer", "text", "type")

    def __init__(self, tracer, text, type_):
        self.tracer, self.text, self.type = tracer, text, type_

    # ----- what Python cannot do on a symbol
    def __bool__(self):
        raise unsupported("Python control flow on a traced value (if, and, or, not, min(), "
                          "max(), a chained comparison)",
                          "use torch.where, &, |, ~, torch.minimum / torch.maximum")

    def __index__(self):
        raise unsupported("a traced value used as a Python int")

    def __int__(self):
        raise unsupported("int() of a traced value", "use .int() or .long()")

    def __float__(self):
        raise unsupported("float() of a traced value (a math-module call?)",
                          "use .float() and torch functions")

    def __iter__(self):
        raise unsupported("iterating over a traced value")

    def __len__(self):
        raise unsupported("len() of a traced value")

    def __hash__(self):
        return id(self)

    def __repr__(self):
        return f"Sym({self.text}: {self.type})"

    # ----- tensor-like attributes mods read
    @property
    def dtype(self):
        import torch
        return {"int": torch.int32, "float": torch.float32, "bool": torch.bool}[self.type]

    @property
    def device(self):
        import torch
        return torch.device("cpu")

    @property
    def shape(self):
        return ()

    def dim(self):
        return 0

    def size(self, *dim):
        return () if not dim else 1

    # ----- operators
    def _bin(self, op, other, reverse=False):
        t = self.tracer
        a, b = self, as_sym(t, other)
        if reverse:
            a, b = b, a
        if op in ("==", "!=", "<", "<=", ">", ">="):
            return t.bind(f"{a.text} {op} {b.text}", "bool")
        if op in ("&", "|", "^"):
            if "float" in (a.type, b.type):
                raise unsupported(f"'{op}' on a float", "it is defined on bools and ints")
            return t.bind(f"{a.text} {op} {b.text}",
                          "bool" if a.type == b.type == "bool" else "int")
        if op == "/":  # torch's / is true division, also on ints
            return t.bind(f"{_float_text(a)} / {b.text}", "float")
        return t.bind(f"{a.text} {op} {b.text}", _promote(a.type, b.type))

    def __add__(self, o): return self._bin("+", o)
    def __radd__(self, o): return self._bin("+", o, True)
    def __sub__(self, o): return self._bin("-", o)
    def __rsub__(self, o): return self._bin("-", o, True)
    def __mul__(self, o): return self._bin("*", o)
    def __rmul__(self, o): return self._bin("*", o, True)
    def __truediv__(self, o): return self._bin("/", o)
    def __rtruediv__(self, o): return self._bin("/", o, True)
    def __floordiv__(self, o): return self._bin("//", o)
    def __rfloordiv__(self, o): return self._bin("//", o, True)
    def __mod__(self, o): return self._bin("%", o)
    def __rmod__(self, o): return self._bin("%", o, True)
    def __and__(self, o): return self._bin("&", o)
    def __rand__(self, o): return self._bin("&", o, True)
    def __or__(self, o): return self._bin("|", o)
    def __ror__(self, o): return self._bin("|", o, True)
    def __xor__(self, o): return self._bin("^", o)
    def __rxor__(self, o): return self._bin("^", o, True)
    def __eq__(self, o): return self._bin("==", o)
    def __ne__(self, o): return self._bin("!=", o)
    def __lt__(self, o): return self._bin("<", o)
    def __le__(self, o): return self._bin("<=", o)
    def __gt__(self, o): return self._bin(">", o)
    def __ge__(self, o): return self._bin(">=", o)

    def __rshift__(self, o):
        # an arithmetic shift by a constant is a floor division
        if isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 31 and self.type != "float":
            return self._bin("//", 1 << o)
        raise unsupported("'>>' by anything but a constant int from 0 to 30")

    def __lshift__(self, o):
        if isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 31 and self.type != "float":
            return self._bin("*", 1 << o)
        raise unsupported("'<<' by anything but a constant int from 0 to 30")

    def __pow__(self, o):
        return _call("pow", self, o)

    def __rpow__(self, o):
        return _call("pow", as_sym(self.tracer, o), self)

    def __neg__(self):
        if self.type == "bool":
            raise unsupported("unary minus on a bool", "use ~ for logical not")
        return self.tracer.bind(f"-{self.text}", self.type)

    def __pos__(self):
        return self

    def __invert__(self):
        return self.tracer.bind(f"~{self.text}", self.type)

    def __abs__(self):
        return _call("abs", self)

    def __getitem__(self, index):
        raise unsupported("indexing a traced value")

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        return _torch_function(func, args, kwargs or {})

    # ----- tensor methods
    def abs(self): return _call("abs", self)
    def exp(self): return _call("exp", self)
    def exp2(self): return _call("exp2", self)
    def log(self): return _call("log", self)
    def log2(self): return _call("log2", self)
    def sqrt(self): return _call("sqrt", self)
    def rsqrt(self): return _call("rsqrt", self)
    def sin(self): return _call("sin", self)
    def cos(self): return _call("cos", self)
    def tan(self): return _call("tan", self)
    def tanh(self): return _call("tanh", self)
    def sigmoid(self): return _call("sigmoid", self)
    def floor(self): return _call("floor", self)
    def ceil(self): return _call("ceil", self)
    def float(self): return _call("float", self)
    def int(self): return _call("int", self)
    def long(self): return _call("int", self)
    def bool(self): return self if self.type == "bool" else self._bin("!=", 0)
    def pow(self, o): return _call("pow", self, o)
    def square(self): return self * self
    def reciprocal(self): return 1.0 / self
    def neg(self): return -self
    def logical_not(self): return self.bool().__invert__()
    def logical_and(self, o): return self.bool() & as_sym(self.tracer, o).bool()
    def logical_or(self, o): return self.bool() | as_sym(self.tracer, o).bool()

    def clamp(self, min=None, max=None):
        return _clamp(self, min, max)

    clip = clamp

    def clamp_min(self, v): return _clamp(self, v, None)
    def clamp_max(self, v): return _clamp(self, None, v)
    def minimum(self, o): return _call("min", self, o)
    def maximum(self, o): return _call("max", self, o)

    def to(self, *args, **kwargs):
        dtype = kwargs.get("dtype")
        for a in args:
            if hasattr(a, "is_floating_point"):
                dtype = a
        return _cast(self, dtype) if dtype is not None else self

    def type_as(self, other):
        return _cast(self, other.dtype)

    def new_ones(self, *a, **k): return Sym(self.tracer, *_literal(True))
    def new_zeros(self, *a, **k): return Sym(self.tracer, *_literal(False))

    def new_full(self, size, fill_value, *a, **k):
        return as_sym(self.tracer, fill_value)

    def new_tensor(self, value, *a, **k):
        return as_sym(self.tracer, value)


def _cast(x, dtype):
    import torch
    if dtype == torch.bool:
        return x.bool()
    if dtype.is_floating_point:
        return _call("float", x)
    return _call("int", x)


def _clamp(x, lo, hi):
    if lo is not None and hi is not None:
        return _call("clamp", x, lo, hi)
    if lo is not None:
        return _call("max", x, lo)
    if hi is not None:
        return _call("min", x, hi)
    return x


def _call(name, *args):
    """A function of the mod language on traced values or constants."""
    tracer = _find_tracer(args)
    syms = [as_sym(tracer, a) for a in args]
    if name in _UNARY_FLOAT or name == "pow":
        type_ = "float"
    elif name in ("float",):
        type_ = "float"
    elif name == "int":
        if syms[0].type == "int":
            return syms[0]
        type_ = "int"
    elif name in ("floor", "ceil"):
        if syms[0].type != "float":
            return syms[0]
        type_ = "float"
    elif name == "where":
        if syms[0].type != "bool":
            syms[0] = syms[0].bool()
        type_ = _promote(syms[1].type, syms[2].type)
        if syms[1].type == syms[2].type == "bool":
            type_ = "bool"
    else:  # abs min max clamp
        type_ = _promote(*(s.type for s in syms))
    return tracer.bind(f"{name}({', '.join(s.text for s in syms)})", type_)


def _find_tracer(values):
    for v in values:
        if isinstance(v, Sym):
            return v.tracer
        if isinstance(v, BufferRef):
            return v.buffer.tracer
        if isinstance(v, (tuple, list)):
            found = _find_tracer(v)
            if found is not None:
                return found
    return None


def _is_approx_tanh(func):
    """A custom op that stands for an approximate tanh: attention-gym's
    `approx::tanh` (lowered to PTX tanh.approx.f32 for its soft-cap) or any
    op named `tanh_approx`. It becomes the language's tanh_approx."""
    qualified = getattr(func, "_qualified_op_name", None)  # an OpOverloadPacket
    if qualified is None and getattr(func, "namespace", None):  # an OpOverload
        qualified = f"{func.namespace}::{getattr(func, '_opname', '')}"
    if not qualified:
        return False
    return qualified == "approx::tanh" or qualified.split("::")[-1] == "tanh_approx"


def _torch_function(func, args, kwargs):
    """torch.X(...) and Tensor.X(...) calls that meet a Sym."""
    name = getattr(func, "__name__", str(func))
    tracer = _find_tracer(list(args) + list(kwargs.values()))
    if name == "__getitem__":
        tensor, index = args
        if isinstance(tensor, Sym):
            raise unsupported("indexing a traced value")
        return _index(tracer.buffer(tensor), [], index)
    if name.startswith("__") and name.endswith("__"):
        import operator
        base = name.strip("_")
        if base.startswith("r") and hasattr(Sym, name):
            op = getattr(operator, "__" + base[1:] + "__", None)
            if op is not None and len(args) == 2:
                return op(as_sym(tracer, args[1]), as_sym(tracer, args[0]))
        op = getattr(operator, name, None)
        if op is not None:
            return op(*(as_sym(tracer, a) if not isinstance(a, (int, float)) else a
                        for a in args))
        raise unsupported(f"the operator {name}")
    x = [as_sym(tracer, a) for a in args[:1]]
    if _is_approx_tanh(func):
        return _call("tanh_approx", x[0])
    if name in _UNARY_FLOAT:
        return _call(name, x[0])
    if name in ("abs", "absolute"):
        return _call("abs", x[0])
    if name in ("floor", "ceil"):
        return _call(name, x[0])
    if name in ("neg", "negative"):
        return -x[0]
    if name == "where":
        return _call("where", *args[:3])
    if name in ("clamp", "clip"):
        lo = kwargs.get("min", args[1] if len(args) > 1 else None)
        hi = kwargs.get("max", args[2] if len(args) > 2 else None)
        return _clamp(x[0], lo, hi)
    if name in ("minimum", "min") and len(args) == 2:
        return _call("min", *args)
    if name in ("maximum", "max") and len(args) == 2:
        return _call("max", *args)
    if name in ("fmin", "fmax") and len(args) == 2:
        # unlike minimum/maximum, a NaN operand gives the other operand
        a, b = as_sym(tracer, args[0]), as_sym(tracer, args[1])
        both = _call("min" if name == "fmin" else "max", a, b)
        if _promote(a.type, b.type) != "float":
            return both
        return _call("where", a != a, b, _call("where", b != b, a, both))
    if name in ("pow", "float_power"):
        return _call("pow", *args)
    if name in ("bitwise_right_shift", "bitwise_left_shift"):
        a = as_sym(tracer, args[0])
        return a >> args[1] if name == "bitwise_right_shift" else a << args[1]
    binary = {"add": "+", "sub": "-", "subtract": "-", "mul": "*", "multiply": "*",
              "true_divide": "/", "floor_divide": "//", "remainder": "%", "eq": "==",
              "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
              "bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^"}
    if name in binary:
        a, b = as_sym(tracer, args[0]), args[1]
        return a._bin(binary[name], b)
    if name == "div":
        mode = kwargs.get("rounding_mode")
        a, b = as_sym(tracer, args[0]), as_sym(tracer, args[1])
        if mode is None:
            return a / b
        if mode == "floor":
            return a // b
        q = a / b
        return _call("int", q) if _promote(a.type, b.type) == "int" else \
            tracer.bind(f"float(int({q.text}))", "float")
    if name in ("logical_and", "logical_or"):
        a, b = as_sym(tracer, args[0]).bool(), as_sym(tracer, args[1]).bool()
        return a & b if name == "logical_and" else a | b
    if name == "logical_not":
        return ~as_sym(tracer, args[0]).bool()
    if name == "bitwise_not":
        return ~as_sym(tracer, args[0])
    if name in ("float", "int", "long", "bool", "to", "type_as", "square", "reciprocal",
                "sigmoid", "new_ones", "new_zeros", "new_full", "new_tensor"):
        return getattr(as_sym(tracer, args[0]), name)(*args[1:], **kwargs)
    if name in ("full_like", "zeros_like", "ones_like"):
        value = {"zeros_like": 0, "ones_like": 1}.get(name, args[1] if len(args) > 1 else
                                                      kwargs.get("fill_value"))
        dtype = kwargs.get("dtype") or as_sym(tracer, args[0]).dtype
        sym = as_sym(tracer, value)
        return _cast(sym, dtype)
    raise unsupported(f"torch function '{name}'")


@dataclasses.dataclass
class Traced:
    """A translated mod: its kind, text and buffers (with the captured
    tensors in declaration order)."""
    kind: int
    text: str
    buffers: list  # [(name, flex dtype, ndim)]
    tensors: list  # the captured tensors, in the order of `buffers`

    @property
    def spec(self):
        """One string for the kind, buffer declarations and text: the key of
        compiled-mod caches and the constant a compiled graph carries."""
        decls = ";".join(f"{n}:{d}:{k}" for n, d, k in self.buffers)
        return f"{self.kind}|{decls}|{self.text}"


def _captured_names(fn, into, depth=0):
    """id(tensor) -> name, from the closure cells and globals of fn and of
    the functions it captures (mod factories wrap other mods)."""
    if depth > 4:
        return
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    scopes = []
    if fn.__closure__:
        scopes.append(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__
                                             if _cell_ok(c))))
    g = getattr(fn, "__globals__", {})
    scopes.append(((n, g[n]) for n in code.co_names if n in g))
    for scope in scopes:
        for name, value in scope:
            if _is_tensor(value):
                into.setdefault(id(value), name)
            elif isinstance(value, types.FunctionType):
                _captured_names(value, into, depth + 1)
            elif isinstance(value, (tuple, list)):
                for item in value:
                    if isinstance(item, types.FunctionType):
                        _captured_names(item, into, depth + 1)


def _cell_ok(cell):
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def locate(fn, tensors):
    """For each tensor, the path that reaches it from fn: steps ("closure", i),
    ("global", name) or ("item", i). A compiled graph follows these paths to
    take the captured tensors as its inputs. A tensor that fn does not
    capture (made inside it) has no path: TypeError."""
    wanted = {id(t): i for i, t in enumerate(tensors)}
    paths = [None] * len(tensors)
    seen = set()

    def visit(obj, path, depth):
        if id(obj) in wanted and paths[wanted[id(obj)]] is None:
            paths[wanted[id(obj)]] = tuple(path)
            return
        if depth > 4 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            for i, cell in enumerate(obj.__closure__ or ()):
                if _cell_ok(cell):
                    visit(cell.cell_contents, path + [("closure", i)], depth + 1)
            g = obj.__globals__
            for name in obj.__code__.co_names:
                if name in g and not isinstance(g[name], types.ModuleType):
                    visit(g[name], path + [("global", name)], depth + 1)
        elif isinstance(obj, (tuple, list)):
            for i, item in enumerate(obj):
                visit(item, path + [("item", i)], depth + 1)

    visit(fn, [], 0)
    for t, path in zip(tensors, paths):
        if path is None:
            raise TypeError(f"the mod {getattr(fn, '__name__', fn)!r} reads a tensor of shape "
                            f"{tuple(t.shape)} that it does not capture from an enclosing scope; "
                            "under torch.compile a mod's tensors must be captured variables")
    return paths


def follow(fn, path):
    """The object at the end of a path from locate (traceable by dynamo)."""
    obj = fn
    for kind, key in path:
        if kind == "closure":
            obj = obj.__closure__[key].cell_contents
        elif kind == "global":
            obj = obj.__globals__[key]
        else:
            obj = obj[key]
    return obj


def _compiling():
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def trace_mod(fn, kind):
    """Translates a score mod (kind MOD_SCORE) or a mask mod (MOD_MASK)."""
    tracer = _Tracer()
    if not _compiling():
        try:
            _captured_names(fn, tracer.names)
        except Exception:  # names are cosmetic
            pass
    variables = [Sym(tracer, n, "int") for n in ("b", "h", "q", "kv")]
    if kind == L.MOD_SCORE:
        result = fn(Sym(tracer, "score", "float"), *variables)
    else:
        result = fn(*variables)
    if isinstance(result, (BufferRef,)) or (_is_tensor(result) and result.numel() != 1):
        raise TypeError(f"the mod {getattr(fn, '__name__', fn)!r} returned {type(result)}, "
                        "not a single traced value")
    if result is None:
        raise TypeError(f"the mod {getattr(fn, '__name__', fn)!r} returned None")
    result = as_sym(tracer, result)
    if kind == L.MOD_MASK and result.type != "bool":
        raise TypeError(f"the mask mod {getattr(fn, '__name__', fn)!r} returned an {result.type}"
                        ", not a bool")
    if kind == L.MOD_SCORE and result.type == "bool":
        raise TypeError(f"the score mod {getattr(fn, '__name__', fn)!r} returned a bool")
    text = "\n".join(tracer.lets + [result.text])
    buffers = [(b.name, b.dtype, b.ndim) for b in tracer.buffers]
    return Traced(kind, text, buffers, [b.tensor for b in tracer.buffers])
