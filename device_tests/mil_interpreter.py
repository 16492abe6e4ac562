"""A NumPy interpreter of Core ML ML Programs: parity checks on Linux, where Core ML can't run.

``coremltools`` predicts only on macOS ("Model prediction is only supported on macOS").
The program itself (``device_tests/mil_program.py``) is plain data, so this module
executes it op by op: one small function per MIL op in ``OP_TABLE``, semantics as in the
MIL op reference (coremltools ``converters/mil/mil/ops/defs``). An op that is not in
the table is an error naming it, raised when the program is loaded (never a silent skip:
a skipped op would make every number after it meaningless).

Precision. Each op computes in float32 from its inputs and its result is rounded to the
dtype the program declares for that variable. An fp16 program (``compute_precision``
FLOAT16) therefore stores every intermediate in float16, as Core ML does between ops, so
fp16 rounding error shows up in the outputs. Accumulation inside an op (convolution,
matmul, reductions) is float32 here; Core ML's GPU also accumulates fp16 convolutions in
float32, the Neural Engine may not, so on device an fp16 model can be somewhat *worse*
than this interpreter says, never better. Weight compression (``constexpr_*`` ops) is
decompressed once at load, exactly as those ops define it, into the dtype declared.

This is not Core ML: it is the program's meaning, evaluated honestly. Results are
labelled as the interpreter's wherever they are reported (``CoreMLRunner.label``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np

from device_tests.mil_program import NUMPY_DTYPES, Literal, Op, Program, Var, load_program
from models.errors import InputError

OpFn = Callable[["OpCall"], Any]
OP_TABLE: dict[str, OpFn] = {}
# Ops evaluated once at load: constants and weight decompression.
CONST_OPS = frozenset({"const"})


class UnsupportedOpError(InputError):
    """The program uses MIL ops this interpreter does not implement."""

    def __init__(self, source: Any, ops: dict[str, int]) -> None:
        self.ops = ops
        found = ", ".join(f"{k} (x{v})" for k, v in sorted(ops.items()))
        super().__init__(source, "MIL ops the NumPy interpreter implements", f"unsupported op(s) {found}")


def register(*names: str) -> Callable[[OpFn], OpFn]:
    def wrap(fn: OpFn) -> OpFn:
        for n in names:
            OP_TABLE[n] = fn
        return fn
    return wrap


def missing_ops(program: Program) -> dict[str, int]:
    """Op types of ``program`` the interpreter lacks, with their counts."""
    out: dict[str, int] = {}
    for op in program.ops:
        if op.type not in OP_TABLE:
            out[op.type] = out.get(op.type, 0) + 1
    return out


_REQUIRED = object()


class OpCall:
    """One op's view of its arguments: inputs bound by name, then attributes (iOS16
    ``constexpr_*`` ops carry their parameters as attributes)."""

    def __init__(self, op: Op, env: dict[str, Any]) -> None:
        self.op = op
        self.env = env

    def _bindings(self, name: str) -> list[Any] | None:
        if name in self.op.inputs:
            return [b.value if isinstance(b, Literal) else self.env[b] for b in self.op.inputs[name]]
        if name in self.op.attributes:
            return [self.op.attributes[name]]
        return None

    def has(self, name: str) -> bool:
        return self._bindings(name) is not None

    def __call__(self, name: str, default: Any = _REQUIRED) -> Any:
        vals = self._bindings(name)
        if vals is None:
            if default is _REQUIRED:
                raise InputError(f"MIL op {self.op.type} -> {self.op.name}", f"an input {name!r}", "none")
            return default
        return vals[0]

    def many(self, name: str) -> list[Any]:
        """A variadic input (``concat(values=(a, b, c))``)."""
        vals = self._bindings(name)
        if vals is None:
            raise InputError(f"MIL op {self.op.type} -> {self.op.name}", f"an input {name!r}", "none")
        if len(vals) == 1 and isinstance(vals[0], (list, tuple)):
            return list(vals[0])
        return vals

    def f(self, name: str, default: Any = _REQUIRED) -> Any:
        """A floating input as float32 (fp16 values up-cast exactly); None stays None."""
        v = self(name, default)
        if v is None:
            return None
        a = np.asarray(v)
        return a.astype(np.float32) if a.dtype.kind == "f" else a

    def ints(self, name: str, default: Any = _REQUIRED) -> list[int]:
        v = self(name, default)
        return [int(i) for i in np.asarray(v).reshape(-1)]

    def scalar(self, name: str, default: Any = _REQUIRED) -> Any:
        v = self(name, default)
        if isinstance(v, np.ndarray):
            return v.reshape(-1)[0].item() if v.size else default
        return v

    @property
    def out(self) -> Var:
        return self.op.outputs[0]


# -- the interpreter -------------------------------------------------------------------

class MILInterpreter:
    """Runs one function of a loaded ``Program`` on NumPy inputs (batch as declared)."""

    def __init__(self, program: Program) -> None:
        missing = missing_ops(program)
        if missing:
            raise UnsupportedOpError(program.path, missing)
        self.program = program
        self.consts: dict[str, Any] = {}
        self.plan: list[Op] = []
        for op in program.ops:
            if op.type in CONST_OPS or op.type.startswith("constexpr_"):
                env = dict(self.consts)
                for var, val in zip(op.outputs, _as_outputs(OP_TABLE[op.type](OpCall(op, env)))):
                    self.consts[var.name] = _to_declared(val, var, op)
            else:
                self.plan.append(op)
        self._last = self._last_use()

    def intermediate_names(self) -> list[str]:
        """Every variable a computing op produces, in execution order."""
        return [v.name for op in self.plan for v in op.outputs]

    def run(self, feeds: dict[str, np.ndarray], keep: Iterable[str] | None = None) -> dict[str, Any]:
        """Outputs of the function, plus the variables named in ``keep`` (``"*"``: all)."""
        env: dict[str, Any] = dict(self.consts)
        for var in self.program.inputs:
            if var.name not in feeds:
                raise InputError(self.program.path, f"an input {var.name!r}", f"inputs {sorted(feeds)}")
            x = np.asarray(feeds[var.name])
            if var.shape is not None and (x.ndim != len(var.shape) or any(
                    d is not None and d != s for d, s in zip(var.shape, x.shape))):
                raise InputError(self.program.path, f"input {var.name!r} of shape {list(var.shape)}",
                                 f"shape {list(x.shape)}")
            env[var.name] = x.astype(NUMPY_DTYPES.get(var.dtype, np.float32))
        keep_all = keep == "*"
        wanted = set(self.program.outputs) | (set() if keep is None or keep_all else set(keep))
        last_use = self._last
        out: dict[str, Any] = {}
        for i, op in enumerate(self.plan):
            try:
                results = _as_outputs(OP_TABLE[op.type](OpCall(op, env)))
            except InputError:
                raise
            except Exception as exc:
                raise RuntimeError(f"MIL op {op.type} -> {op.name} failed: {type(exc).__name__}: {exc}") from exc
            if len(results) != len(op.outputs):
                raise RuntimeError(f"MIL op {op.type} -> {op.name}: {len(results)} results for "
                                   f"{len(op.outputs)} outputs")
            for var, val in zip(op.outputs, results):
                val = _to_declared(val, var, op)
                env[var.name] = val
                if keep_all or var.name in wanted:
                    out[var.name] = val
            if not keep_all:     # free what no later op reads (large nets at full resolution)
                for name in op.input_names():
                    if last_use.get(name) == i and name not in wanted and name not in self.consts:
                        env.pop(name, None)
        missing = [n for n in self.program.outputs if n not in out]
        if missing:
            raise RuntimeError(f"program outputs never produced: {missing}")
        return out

    def _last_use(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for i, op in enumerate(self.plan):
            for name in op.input_names():
                last[name] = i
        return last


def load_interpreter(path: str, function: str = "main") -> MILInterpreter:
    return MILInterpreter(load_program(path, function))


def _as_outputs(res: Any) -> list[Any]:
    return list(res) if isinstance(res, tuple) else [res]


def _to_declared(val: Any, var: Var, op: Op) -> Any:
    """Round/cast a result to the dtype the program declares, and check its shape."""
    if var.shape is None or var.dtype not in NUMPY_DTYPES:
        return val
    arr = np.asarray(val)
    dt = NUMPY_DTYPES[var.dtype]
    if arr.dtype != dt:
        arr = arr.astype(dt)
    if len(var.shape) != arr.ndim or any(d is not None and d != s for d, s in zip(var.shape, arr.shape)):
        raise RuntimeError(f"MIL op {op.type} -> {var.name}: computed shape {list(arr.shape)}, "
                           f"the program declares {list(var.shape)}")
    return arr


# -- constants and weight decompression -------------------------------------------------

@register("const")
def _const(c: OpCall) -> Any:
    return c("val")


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """LSB-first bit fields (MIL's packing for sub-byte indices and masks)."""
    bits = np.unpackbits(np.asarray(packed, np.uint8).reshape(-1), bitorder="little")[:count * nbits]
    return (bits.reshape(count, nbits).astype(np.int32) << np.arange(nbits)).sum(1)


def _promote(param: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A per-axis scale/zero point vector, shaped to broadcast against rank-``rank`` data."""
    p = np.asarray(param)
    if p.ndim == 0:
        return p
    shape = [1] * rank
    shape[axis % rank] = p.size
    return p.reshape(shape)


@register("constexpr_affine_dequantize")
def _affine_dequantize(c: OpCall) -> np.ndarray:
    # iOS16: out = scale * (quantized_data - zero_point), scale/zero point along `axis`.
    q = np.asarray(c("quantized_data"))
    axis = int(c.scalar("axis"))
    zp = _promote(np.asarray(c("zero_point")).astype(np.float32), q.ndim, axis)
    scale = _promote(np.asarray(c("scale")).astype(np.float32), q.ndim, axis)
    return (q.astype(np.float32) - zp) * scale


@register("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(c: OpCall) -> np.ndarray:
    # iOS18: out[i] = scale[i // block] * (data[i] - offset[i // block]), block = data/scale shape.
    data = np.asarray(c("data")).astype(np.float32)
    scale = np.asarray(c("scale")).astype(np.float32)
    offset = c("offset", None)
    offset = None if offset is None else np.asarray(offset).astype(np.float32)
    for ax, (d, s) in enumerate(zip(data.shape, scale.shape)):
        if d != s:
            scale = np.repeat(scale, d // s, ax)
            if offset is not None:
                offset = np.repeat(offset, d // s, ax)
    return scale * (data - offset if offset is not None else data)


@register("constexpr_cast")
def _constexpr_cast(c: OpCall) -> np.ndarray:
    return np.asarray(c("source_val"))          # cast to the declared dtype by the caller


@register("constexpr_lut_to_dense")
def _lut_to_dense(c: OpCall) -> np.ndarray:
    lut = np.asarray(c("lut"))
    if c.has("shape"):
        # iOS16: indices are n-bit fields packed into bytes, one flat LUT for the tensor.
        shape = c.ints("shape")
        nbits = int(round(math.log2(lut.size)))
        idx = _unpack_bits(c("indices"), nbits, int(np.prod(shape)))
        return lut[idx].reshape(shape)
    # iOS18: indices (uintN, output-shaped), lut [*groups, palettes, vector_size].
    idx = np.asarray(c("indices")).astype(np.int64)
    groups, n_pal, vsize = lut.shape[:-2], lut.shape[-2], lut.shape[-1]
    vector_axis = c.scalar("vector_axis", None)
    if vsize > 1:
        vector_axis = int(vector_axis) % idx.ndim
    blocks = [d // g for d, g in zip(idx.shape, groups)]
    grid = np.ix_(*[np.arange(d) // b for d, b in zip(idx.shape, blocks)])
    gid = np.zeros(idx.shape, np.int64)
    for ax, g in enumerate(grid):
        gid = gid * groups[ax] + g
    flat = lut.reshape(-1, n_pal, vsize)
    out = flat[gid, idx]                                     # (*idx.shape, vsize)
    if vsize == 1:
        return out[..., 0]
    out = np.moveaxis(out, -1, vector_axis + 1)
    shape = list(idx.shape)
    shape[vector_axis] *= vsize
    return out.reshape(shape)


@register("constexpr_sparse_to_dense")
def _sparse_to_dense(c: OpCall) -> np.ndarray:
    data = np.asarray(c("nonzero_data"))
    if c.has("shape"):
        # iOS16: a flat bit mask packed LSB first, one bit per output element.
        shape = c.ints("shape")
        mask = _unpack_bits(c("mask"), 1, int(np.prod(shape))).reshape(shape)
    else:
        mask = np.asarray(c("mask"))
    if int(np.count_nonzero(mask)) != data.size:
        raise InputError(f"MIL op {c.op.type} -> {c.op.name}", f"{np.count_nonzero(mask)} non-zero values",
                         f"{data.size}")
    out = np.zeros(mask.shape, data.dtype)
    out[mask != 0] = data
    return out


# -- convolution and pooling ------------------------------------------------------------

def _pads(pad_type: str, pad: list[int], in_sizes: tuple[int, ...], kernel: list[int],
          strides: list[int], dilations: list[int]) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, as MIL's ``aggregated_pad`` defines it."""
    n = len(kernel)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        out = []
        for i, k, s, d in zip(in_sizes, kernel, strides, dilations):
            keff = (k - 1) * d + 1
            total = max(0, s * math.ceil(i / s) - i + keff - s)
            small, big = total // 2, total - total // 2
            out.append((small, big) if pad_type == "same" else (big, small))
        return out
    raise InputError("MIL pad_type", "valid, same, same_lower or custom", repr(pad_type))


def _windows(x: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int],
             out_sizes: list[int]) -> np.ndarray:
    """(N, C, *kernel, *out) view-copies of every window of a padded NC(H)(W) array."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    ho, wo = out_sizes
    n, ch = x.shape[:2]
    cols = np.empty((n, ch, kh, kw, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh,
                                 j * dw:j * dw + sw * (wo - 1) + 1:sw]
    return cols


def _as_2d(x: np.ndarray, *params: list[int]) -> tuple[np.ndarray, list[list[int]]]:
    """1-D spatial ops run as 2-D ones with a height of 1."""
    if x.ndim == 3:
        return x[:, :, None, :], [[1] + list(p) for p in params]
    if x.ndim != 4:
        raise InputError("MIL op", "a 1-D or 2-D spatial tensor (rank 3 or 4)", f"rank {x.ndim}")
    return x, [list(p) for p in params]


@register("conv")
def _conv(c: OpCall) -> np.ndarray:
    x, w = c.f("x"), c.f("weight")
    b = c.f("bias", None)
    nsp = x.ndim - 2
    strides = c.ints("strides", [1] * nsp)
    dil = c.ints("dilations", [1] * nsp)
    groups = int(c.scalar("groups", 1))
    pads = _pads(c.scalar("pad_type", "valid"), c.ints("pad", [0] * 2 * nsp), x.shape[2:],
                 list(w.shape[2:]), strides, dil)
    squeeze = x.ndim == 3
    if squeeze:
        w = w[:, :, None, :]
        pads = [(0, 0)] + pads
    x, (strides, dil) = _as_2d(x, strides, dil)
    xp = np.pad(x, [(0, 0), (0, 0), *pads])
    o, cg, kh, kw = w.shape
    ho = (xp.shape[2] - (kh - 1) * dil[0] - 1) // strides[0] + 1
    wo = (xp.shape[3] - (kw - 1) * dil[1] - 1) // strides[1] + 1
    cols = _windows(xp, [kh, kw], strides, dil, [ho, wo])            # (N, C, kh, kw, ho, wo)
    n = x.shape[0]
    cols = cols.reshape(n, groups, cg * kh * kw, ho * wo)
    wg = w.reshape(groups, o // groups, cg * kh * kw)
    y = np.matmul(wg[None], cols).reshape(n, o, ho, wo)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return y[:, :, 0, :] if squeeze else y


def _pool(c: OpCall, kind: str) -> np.ndarray:
    x = c.f("x")
    nsp = x.ndim - 2
    kernel = c.ints("kernel_sizes")
    strides = c.ints("strides", [1] * nsp)
    pads = _pads(c.scalar("pad_type", "valid"), c.ints("pad", [0] * 2 * nsp), x.shape[2:], kernel,
                 strides, [1] * nsp)
    out_sizes = [d for d in c.out.shape[2:]]          # honours ceil_mode as the program declares
    squeeze = x.ndim == 3
    if squeeze:
        pads, out_sizes = [(0, 0)] + pads, [1] + out_sizes
    x, (kernel, strides) = _as_2d(x, kernel, strides)
    # ceil_mode: windows may run past the declared padding; that overhang is never data.
    over = [max(0, (o - 1) * s + k - (i + p0 + p1))
            for o, s, k, i, (p0, p1) in zip(out_sizes, strides, kernel, x.shape[2:], pads)]
    full = [(p0, p1 + e) for (p0, p1), e in zip(pads, over)]
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, [(0, 0), (0, 0), *full], constant_values=fill)
    cols = _windows(xp, kernel, strides, [1, 1], out_sizes)
    if kind == "max":
        y = cols.max(axis=(2, 3))
    elif kind == "l2":
        y = np.sqrt((cols * cols).sum(axis=(2, 3)))
    else:
        exclude = bool(c.scalar("exclude_padding_from_average", False))
        ones = np.ones((1, 1) + x.shape[2:], np.float32)
        if exclude:
            count_src = np.pad(ones, [(0, 0), (0, 0), *full])
        else:   # padding counts, the ceil-mode overhang does not (as PyTorch's count_include_pad)
            count_src = np.pad(np.pad(ones, [(0, 0), (0, 0), *pads], constant_values=1.0),
                               [(0, 0), (0, 0), *[(0, e) for e in over]])
        count = _windows(count_src, kernel, strides, [1, 1], out_sizes).sum(axis=(2, 3))
        y = cols.sum(axis=(2, 3)) / count
    return y[:, :, 0, :] if squeeze else y


register("max_pool")(lambda c: _pool(c, "max"))
register("avg_pool")(lambda c: _pool(c, "avg"))
register("l2_pool")(lambda c: _pool(c, "l2"))


@register("linear")
def _linear(c: OpCall) -> np.ndarray:
    y = np.matmul(c.f("x"), c.f("weight").T)
    b = c.f("bias", None)
    return y + b if b is not None else y


@register("matmul")
def _matmul(c: OpCall) -> np.ndarray:
    x, y = c.f("x"), c.f("y")
    if c.scalar("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if c.scalar("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@register("einsum")
def _einsum(c: OpCall) -> np.ndarray:
    return np.einsum(c.scalar("equation"), *[np.asarray(v, np.float32) for v in c.many("values")])


# -- normalization -------------------------------------------------------------------

def _channel(v: np.ndarray | None, rank: int) -> np.ndarray | None:
    return None if v is None else v.reshape((1, -1) + (1,) * (rank - 2))


@register("batch_norm")
def _batch_norm(c: OpCall) -> np.ndarray:
    x = c.f("x")
    mean, var = _channel(c.f("mean"), x.ndim), _channel(c.f("variance"), x.ndim)
    gamma, beta = _channel(c.f("gamma", None), x.ndim), _channel(c.f("beta", None), x.ndim)
    eps = np.float32(c.scalar("epsilon", 1e-5))
    y = (x - mean) / np.sqrt(var + eps)
    if gamma is not None:
        y = y * gamma
    return y + beta if beta is not None else y


@register("instance_norm")
def _instance_norm(c: OpCall) -> np.ndarray:
    x = c.f("x")
    axes = tuple(range(2, x.ndim))
    eps = np.float32(c.scalar("epsilon", 1e-5))
    mean = x.mean(axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    gamma, beta = _channel(c.f("gamma", None), x.ndim), _channel(c.f("beta", None), x.ndim)
    if gamma is not None:
        y = y * gamma
    return y + beta if beta is not None else y


@register("layer_norm")
def _layer_norm(c: OpCall) -> np.ndarray:
    x = c.f("x")
    axes = c("axes", None)
    axes = tuple(range(x.ndim)) if axes is None else tuple(sorted(int(a) % x.ndim for a in np.ravel(axes)))
    eps = np.float32(c.scalar("epsilon", 1e-5))
    mean = x.mean(axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    gamma, beta = c.f("gamma", None), c.f("beta", None)
    if gamma is not None:
        y = y * gamma.reshape(shape)
    return y + beta.reshape(shape) if beta is not None else y


@register("l2_norm")
def _l2_norm(c: OpCall) -> np.ndarray:
    x = c.f("x")
    eps = np.float32(c.scalar("epsilon", 1e-6))
    axes = tuple(range(1, x.ndim)) if x.ndim > 1 else (0,)
    return x / np.sqrt(np.maximum((x * x).sum(axes, keepdims=True), eps))


# -- activations --------------------------------------------------------------------

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


def _unary(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
    register(name)(lambda c: fn(c.f("x")))


_unary("relu", lambda x: np.maximum(x, np.float32(0)))
_unary("relu6", lambda x: np.clip(x, np.float32(0), np.float32(6)))
_unary("sigmoid", _sigmoid)
_unary("silu", lambda x: x * _sigmoid(x))
_unary("tanh", np.tanh)
_unary("softsign", lambda x: x / (1 + np.abs(x)))
_unary("softplus", lambda x: np.logaddexp(np.float32(0), x))
_unary("abs", np.abs)
_unary("exp", np.exp)
_unary("exp2", np.exp2)
_unary("sqrt", np.sqrt)
_unary("square", np.square)
_unary("sign", np.sign)
_unary("floor", np.floor)
_unary("ceil", np.ceil)
_unary("round", np.round)                       # MIL: round half to even, as NumPy
_unary("sin", np.sin)
_unary("cos", np.cos)
_unary("atan", np.arctan)
_unary("logical_not", np.logical_not)


def _erf64(x: np.ndarray) -> np.ndarray:
    """erf in float64 (SciPy's vectorised one when present; it is, with scikit-learn)."""
    try:
        from scipy.special import erf
    except ImportError:                                   # pragma: no cover
        return np.vectorize(math.erf, otypes=[np.float64])(x)
    return erf(x)


@register("erf")
def _erf(c: OpCall) -> np.ndarray:
    return _erf64(c.f("x").astype(np.float64)).astype(np.float32)


@register("rsqrt")
def _rsqrt(c: OpCall) -> np.ndarray:
    return 1.0 / np.sqrt(c.f("x") + np.float32(c.scalar("epsilon", 1e-12)))


@register("inverse")
def _inverse(c: OpCall) -> np.ndarray:
    return 1.0 / (c.f("x") + np.float32(c.scalar("epsilon", 1e-4)))


@register("log")
def _log(c: OpCall) -> np.ndarray:
    return np.log(c.f("x") + np.float32(c.scalar("epsilon", 1e-45)))


@register("clip")
def _clip(c: OpCall) -> np.ndarray:
    return np.clip(c.f("x"), np.float32(c.scalar("alpha")), np.float32(c.scalar("beta")))


@register("threshold")
def _threshold(c: OpCall) -> np.ndarray:
    return np.maximum(c.f("x"), np.float32(c.scalar("alpha")))


@register("sigmoid_hard")
def _sigmoid_hard(c: OpCall) -> np.ndarray:
    a, b = np.float32(c.scalar("alpha", 0.2)), np.float32(c.scalar("beta", 0.5))
    return np.clip(a * c.f("x") + b, np.float32(0), np.float32(1))


@register("leaky_relu")
def _leaky_relu(c: OpCall) -> np.ndarray:
    x = c.f("x")
    return np.where(x >= 0, x, np.float32(c.scalar("alpha", 0.01)) * x)


@register("elu")
def _elu(c: OpCall) -> np.ndarray:
    x = c.f("x")
    return np.where(x > 0, x, np.float32(c.scalar("alpha", 1.0)) * np.expm1(x))


@register("prelu")
def _prelu(c: OpCall) -> np.ndarray:
    x = c.f("x")
    alpha = _channel(c.f("alpha"), x.ndim)
    return np.where(x >= 0, x, alpha * x)


@register("thresholded_relu")
def _thresholded_relu(c: OpCall) -> np.ndarray:
    x = c.f("x")
    return np.where(x > np.float32(c.scalar("alpha", 1.0)), x, np.float32(0))


@register("clamped_relu")
def _clamped_relu(c: OpCall) -> np.ndarray:
    x = c.f("x")
    a, b = np.float32(c.scalar("alpha")), np.float32(c.scalar("beta"))
    return np.minimum(np.where(x >= 0, x, a * x), b)


@register("scaled_tanh")
def _scaled_tanh(c: OpCall) -> np.ndarray:
    return np.float32(c.scalar("alpha", 1.0)) * np.tanh(np.float32(c.scalar("beta", 1.0)) * c.f("x"))


@register("linear_activation")
def _linear_activation(c: OpCall) -> np.ndarray:
    return np.float32(c.scalar("alpha", 1.0)) * c.f("x") + np.float32(c.scalar("beta", 0.0))


@register("gelu")
def _gelu(c: OpCall) -> np.ndarray:
    x = c.f("x")
    mode = c.scalar("mode", "EXACT")
    if mode == "EXACT":
        erf = _erf64(x.astype(np.float64) / math.sqrt(2.0))
        return (0.5 * x.astype(np.float64) * (1.0 + erf)).astype(np.float32)
    if mode == "TANH_APPROXIMATION":
        inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x ** 3)
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(np.float32(1.702) * x)
    raise InputError(f"MIL op gelu -> {c.op.name}", "mode EXACT, TANH_APPROXIMATION or SIGMOID_APPROXIMATION",
                     repr(mode))


@register("softmax")
def _softmax(c: OpCall) -> np.ndarray:
    x = c.f("x")
    axis = int(c.scalar("axis", -1))
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@register("softplus_parametric")
def _softplus_parametric(c: OpCall) -> np.ndarray:
    x = c.f("x")
    a, b = _channel(c.f("alpha"), x.ndim), _channel(c.f("beta"), x.ndim)
    return a * np.logaddexp(np.float32(0), b * x)


# -- elementwise binary -----------------------------------------------------------------

def _binary(name: str, fn: Callable[[Any, Any], Any]) -> None:
    register(name)(lambda c: fn(c.f("x"), c.f("y")))


_binary("add", np.add)
_binary("sub", np.subtract)
_binary("mul", np.multiply)
_binary("real_div", np.divide)
_binary("maximum", np.maximum)
_binary("minimum", np.minimum)
_binary("pow", np.power)
_binary("floor_div", np.floor_divide)
_binary("mod", np.mod)
_binary("equal", np.equal)
_binary("not_equal", np.not_equal)
_binary("less", np.less)
_binary("less_equal", np.less_equal)
_binary("greater", np.greater)
_binary("greater_equal", np.greater_equal)
_binary("logical_and", np.logical_and)
_binary("logical_or", np.logical_or)
_binary("logical_xor", np.logical_xor)


# -- reductions ------------------------------------------------------------------------

def _reduce(name: str, fn: Callable[..., np.ndarray]) -> None:
    def run(c: OpCall) -> np.ndarray:
        x = c.f("x")
        axes = c("axes", None)
        axes = None if axes is None else tuple(int(a) for a in np.ravel(axes))
        return fn(x, axis=axes, keepdims=bool(c.scalar("keep_dims", False)))
    register(name)(run)


_reduce("reduce_mean", np.mean)
_reduce("reduce_sum", np.sum)
_reduce("reduce_max", np.max)
_reduce("reduce_min", np.min)
_reduce("reduce_prod", np.prod)
_reduce("reduce_l2_norm", lambda x, axis, keepdims: np.sqrt((x * x).sum(axis=axis, keepdims=keepdims)))
_reduce("reduce_l1_norm", lambda x, axis, keepdims: np.abs(x).sum(axis=axis, keepdims=keepdims))
_reduce("reduce_sum_square", lambda x, axis, keepdims: (x * x).sum(axis=axis, keepdims=keepdims))
_reduce("reduce_log_sum_exp", lambda x, axis, keepdims: np.log(np.exp(x).sum(axis=axis, keepdims=keepdims)))


@register("reduce_argmax", "reduce_argmin")
def _reduce_arg(c: OpCall) -> np.ndarray:
    x = c.f("x")
    axis = int(c.scalar("axis", -1))
    fn = np.argmax if c.op.type == "reduce_argmax" else np.argmin
    out = fn(x, axis=axis)
    return np.expand_dims(out, axis) if c.scalar("keep_dims", False) else out


# -- shapes and data movement -------------------------------------------------------------

@register("identity")
def _identity(c: OpCall) -> Any:
    return c("x")


@register("cast")
def _cast(c: OpCall) -> np.ndarray:
    return np.asarray(c("x"))                    # the declared output dtype does the cast


@register("reshape")
def _reshape(c: OpCall) -> np.ndarray:
    x = np.asarray(c("x"))
    shape = c.ints("shape")
    if len(shape) == x.ndim:                     # 0 copies the input's dimension
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@register("flatten2d")
def _flatten2d(c: OpCall) -> np.ndarray:
    x = np.asarray(c("x"))
    axis = int(c.scalar("axis", 1)) % max(1, x.ndim)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@register("transpose")
def _transpose(c: OpCall) -> np.ndarray:
    return np.transpose(np.asarray(c("x")), c.ints("perm"))


@register("expand_dims")
def _expand_dims(c: OpCall) -> np.ndarray:
    x = np.asarray(c("x"))
    rank = x.ndim + len(c.ints("axes"))
    for a in sorted(a % rank for a in c.ints("axes")):
        x = np.expand_dims(x, a)
    return x


@register("squeeze")
def _squeeze(c: OpCall) -> np.ndarray:
    x = np.asarray(c("x"))
    axes = c("axes", None)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(int(a) % x.ndim for a in np.ravel(axes)))


@register("concat")
def _concat(c: OpCall) -> np.ndarray:
    values = [np.asarray(v) for v in c.many("values")]
    axis = int(c.scalar("axis"))
    if c.scalar("interleave", False):
        stacked = np.stack(values, axis=axis % values[0].ndim + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@register("stack")
def _stack(c: OpCall) -> np.ndarray:
    return np.stack([np.asarray(v) for v in c.many("values")], axis=int(c.scalar("axis")))


@register("split")
def _split(c: OpCall) -> tuple[np.ndarray, ...]:
    x = np.asarray(c("x"))
    axis = int(c.scalar("axis"))
    sizes = c("split_sizes", None)
    if sizes is not None:
        cuts = np.cumsum([int(s) for s in np.ravel(sizes)])[:-1]
        return tuple(np.split(x, cuts, axis=axis))
    return tuple(np.split(x, int(c.scalar("num_splits")), axis=axis))


@register("slice_by_index")
def _slice_by_index(c: OpCall) -> np.ndarray:
    x = np.asarray(c("x"))
    r = x.ndim
    begin, end = c.ints("begin"), c.ints("end")
    stride = c.ints("stride", [1] * r)
    bmask = [bool(v) for v in np.ravel(c("begin_mask", [False] * r))]
    emask = [bool(v) for v in np.ravel(c("end_mask", [False] * r))]
    smask = [bool(v) for v in np.ravel(c("squeeze_mask", [False] * r))]
    idx: list[Any] = []
    for i in range(r):
        if smask[i]:
            idx.append(begin[i])
        else:
            idx.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    return x[tuple(idx)]


@register("slice_by_size")
def _slice_by_size(c: OpCall) -> np.ndarray:
    x = np.asarray(c("x"))
    begin, size = c.ints("begin"), c.ints("size")
    idx = []
    for i, (b, s) in enumerate(zip(begin, size)):
        b = b % x.shape[i] if b < 0 else b
        idx.append(slice(b, None if s == -1 else b + s))
    return x[tuple(idx)]


@register("pad")
def _pad(c: OpCall) -> np.ndarray:
    x = c.f("x")
    pad = c.ints("pad")
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = c.scalar("mode", "constant")
    if mode == "constant":
        return np.pad(x, widths, constant_values=np.float32(c.scalar("constant_val", 0.0)))
    if mode == "reflect":
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise InputError(f"MIL op pad -> {c.op.name}", "mode constant, reflect or replicate", repr(mode))


@register("tile")
def _tile(c: OpCall) -> np.ndarray:
    return np.tile(np.asarray(c("x")), c.ints("reps"))


@register("shape")
def _shape(c: OpCall) -> np.ndarray:
    return np.asarray(np.asarray(c("x")).shape, np.int32)


@register("gather")
def _gather(c: OpCall) -> np.ndarray:
    x = np.asarray(c("x"))
    indices = np.asarray(c("indices")).astype(np.int64)
    axis = int(c.scalar("axis", 0)) % x.ndim
    if int(c.scalar("batch_dims", 0)):
        raise InputError(f"MIL op gather -> {c.op.name}", "batch_dims 0", f"batch_dims {c.scalar('batch_dims')}")
    return np.take(x, np.where(indices < 0, indices + x.shape[axis], indices), axis=axis)


@register("pixel_shuffle")
def _pixel_shuffle(c: OpCall) -> np.ndarray:
    x = np.asarray(c("x"))
    r = int(c.scalar("upscale_factor"))
    n, ch, h, w = x.shape
    y = x.reshape(n, ch // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, ch // (r * r), h * r, w * r)


@register("upsample_nearest_neighbor")
def _upsample_nn(c: OpCall) -> np.ndarray:
    x = np.asarray(c("x"))
    sh, sw = c.scalar("scale_factor_height", 1), c.scalar("scale_factor_width", 1)
    if float(sh) != int(sh) or float(sw) != int(sw):
        raise InputError(f"MIL op upsample_nearest_neighbor -> {c.op.name}", "integer scale factors",
                         f"{sh}, {sw}")
    return x.repeat(int(sh), axis=-2).repeat(int(sw), axis=-1)


@register("classify")
def _classify(c: OpCall) -> tuple[str, dict[str, float]]:
    """The classifier head: the top label and a label -> probability dictionary (batch 1)."""
    probs = np.asarray(c("probabilities"), np.float32).reshape(-1)
    classes = [str(k) for k in np.ravel(np.asarray(c("classes"), dtype=object))]
    if len(classes) != probs.size:
        raise InputError(f"MIL op classify -> {c.op.name}", f"{len(classes)} probabilities", f"{probs.size}")
    return classes[int(probs.argmax())], {k: float(v) for k, v in zip(classes, probs)}
