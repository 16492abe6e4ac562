"""Read an ML Program (``.mlpackage``) as data: its ops, its variables and its weights.

Core ML only *runs* on Apple platforms, but an ML Program is plain data anywhere: a
protobuf (``Data/com.apple.CoreML/model.mlmodel``, the MIL program in
``spec.mlProgram``) and a weight blob file (``weights/weight.bin``). This module turns
them into a ``Program`` (ops in execution order, every value decoded to NumPy) for the
NumPy interpreter (``device_tests/mil_interpreter.py``). Nothing here is derived from
PyTorch: what is read is what Core ML would load.

The blob file format is Apple's MIL blob storage v2 (``mlmodel/src/MILBlob/Blob/
StorageFormat.hpp`` in coremltools): a 64-byte ``storage_header`` {uint32 count,
uint32 version = 2, reserved}, then per blob a 64-byte ``blob_metadata`` {uint32
sentinel = 0xDEADBEEF, uint32 dtype, uint64 size in bytes, uint64 data offset,
reserved} followed by its data; a const's ``blobFileValue.offset`` points at the
metadata. Sub-byte types (int4, uint1..uint6) are packed least significant bit first,
the same order as the ``bytes`` of an immediate value.

Everything read is untrusted: blob paths must stay inside the package, offsets and sizes
inside the file, and the blob's dtype must be the one the program declares.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from exporters.artifact import safe_join
from models.errors import InputError
from models.util import error_line

# MIL.proto DataType -> short name used throughout (as coremltools names them).
MIL_DTYPES: dict[int, str] = {
    1: "bool", 2: "string", 10: "fp16", 11: "fp32", 12: "fp64", 13: "bf16",
    21: "int8", 22: "int16", 23: "int32", 24: "int64", 25: "int4",
    31: "uint8", 32: "uint16", 33: "uint32", 34: "uint64", 35: "uint4",
    36: "uint2", 37: "uint1", 38: "uint6", 39: "uint3", 40: "fp8e4m3fn", 41: "fp8e5m2",
}
NUMPY_DTYPES: dict[str, Any] = {
    "bool": np.bool_, "fp16": np.float16, "fp32": np.float32, "fp64": np.float64,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    # sub-byte integers are unpacked into the smallest NumPy type holding them
    "int4": np.int8, "uint1": np.uint8, "uint2": np.uint8, "uint3": np.uint8,
    "uint4": np.uint8, "uint6": np.uint8,
}
SUB_BYTE_BITS = {"int4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6}

# StorageFormat.hpp / BlobDataType.hpp
BLOB_DTYPES: dict[int, str] = {
    1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 5: "bf16", 6: "int16", 7: "uint16",
    8: "int4", 9: "uint1", 10: "uint2", 11: "uint4", 12: "uint3", 13: "uint6",
    14: "int32", 15: "uint32", 16: "fp8e4m3fn", 17: "fp8e5m2",
}
BLOB_SENTINEL = 0xDEADBEEF
_HEADER = struct.Struct("<II56x")
_METADATA = struct.Struct("<IIQQQ32x")      # sentinel, dtype, size, offset, padding bits
MODEL_PATH_PREFIX = "@model_path/"


@dataclass(frozen=True)
class Var:
    """A typed MIL variable; ``shape`` is None for non-tensors, a dim None when unknown."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None


@dataclass
class Op:
    """One MIL operation. ``inputs`` binds each parameter to variable names (``str``) or
    to values given in place (``Literal``); ``attributes`` are decoded values."""

    type: str
    outputs: list[Var]
    inputs: dict[str, list["str | Literal"]]
    attributes: dict[str, Any]

    @property
    def name(self) -> str:
        return self.outputs[0].name if self.outputs else self.type

    def input_names(self) -> list[str]:
        return [b for binds in self.inputs.values() for b in binds if isinstance(b, str)]


@dataclass(frozen=True)
class Literal:
    """A value bound directly in an op's input list (no ``const`` op of its own)."""

    value: Any


@dataclass
class BlobRef:
    """Where a const's value lives in the weight file (for tests that edit weights)."""

    file: Path
    metadata_offset: int
    data_offset: int
    size: int
    dtype: str


@dataclass
class Program:
    path: Path
    function: str
    opset: str
    spec_version: int
    inputs: list[Var]
    outputs: list[str]
    ops: list[Op]
    description: Any                  # Model_pb2.ModelDescription (inputs, outputs, metadata)
    # const output name (or "<op output>:<param>" for a value bound in place) -> its blob
    blobs: dict[str, BlobRef] = field(default_factory=dict)

    def op_types(self) -> list[str]:
        """Distinct op types, in first-use order."""
        return list(dict.fromkeys(op.type for op in self.ops))

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.type] = counts.get(op.type, 0) + 1
        return dict(sorted(counts.items()))

    @cached_property
    def vars(self) -> dict[str, Var]:
        out = {v.name: v for v in self.inputs}
        for op in self.ops:
            out.update({v.name: v for v in op.outputs})
        return out


# -- the blob file --------------------------------------------------------------------

class BlobFile:
    """Random access to a MIL blob storage file (read into memory once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data = path.read_bytes()
        except OSError as exc:
            raise InputError(path, "a readable Core ML weight file", error_line(exc)) from None
        if len(self.data) < _HEADER.size:
            raise InputError(path, "a MIL blob storage file", f"{len(self.data)} bytes")
        count, version = _HEADER.unpack_from(self.data, 0)
        if version != 2:
            raise InputError(path, "MIL blob storage version 2", f"version {version}")
        self.count = count

    def locate(self, offset: int) -> BlobRef:
        if offset < _HEADER.size or offset + _METADATA.size > len(self.data):
            raise InputError(self.path, "a blob offset inside the file", f"offset {offset}")
        sentinel, code, size, data_offset, _pad = _METADATA.unpack_from(self.data, offset)
        if sentinel != BLOB_SENTINEL:
            raise InputError(self.path, f"blob metadata (sentinel 0x{BLOB_SENTINEL:X}) at offset {offset}",
                             f"0x{sentinel:X}")
        if code not in BLOB_DTYPES:
            raise InputError(self.path, "a known blob data type", f"code {code} at offset {offset}")
        if data_offset + size > len(self.data):
            raise InputError(self.path, "blob data inside the file",
                             f"{size} bytes at {data_offset} (file has {len(self.data)})")
        return BlobRef(self.path, offset, data_offset, size, BLOB_DTYPES[code])

    def read(self, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        ref = self.locate(offset)
        if ref.dtype != dtype:
            raise InputError(self.path, f"a {dtype} blob at offset {offset} (as the program declares)",
                             f"a {ref.dtype} blob")
        raw = self.data[ref.data_offset:ref.data_offset + ref.size]
        return decode_raw(raw, dtype, shape, source=f"{self.path}@{offset}")


def decode_raw(raw: bytes, dtype: str, shape: tuple[int, ...], source: str = "") -> np.ndarray:
    """Little-endian bytes -> array of ``shape`` (sub-byte types unpacked LSB first)."""
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if dtype in SUB_BYTE_BITS:
        bits = SUB_BYTE_BITS[dtype]
        need = -(-count * bits // 8)
        if len(raw) < need:
            raise InputError(source, f"{need} bytes of packed {dtype}", f"{len(raw)} bytes")
        flat = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:count * bits]
        vals = (flat.reshape(count, bits).astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(
            1, dtype=np.int16)
        if dtype == "int4":
            vals = np.where(vals >= 8, vals - 16, vals)
        return vals.astype(NUMPY_DTYPES[dtype]).reshape(shape)
    if dtype in ("bf16", "fp8e4m3fn", "fp8e5m2"):
        import ml_dtypes
        np_dtype = {"bf16": ml_dtypes.bfloat16, "fp8e4m3fn": ml_dtypes.float8_e4m3fn,
                    "fp8e5m2": ml_dtypes.float8_e5m2}[dtype]
    elif dtype in NUMPY_DTYPES:
        np_dtype = NUMPY_DTYPES[dtype]
    else:
        raise InputError(source, "a numeric tensor type", dtype)
    itemsize = np.dtype(np_dtype).itemsize
    if len(raw) < count * itemsize:
        raise InputError(source, f"{count * itemsize} bytes of {dtype}", f"{len(raw)} bytes")
    arr = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder("<"), count=count)
    if dtype in ("bf16", "fp8e4m3fn", "fp8e5m2"):
        arr = arr.astype(np.float32)
    return arr.reshape(shape).copy()


# -- protobuf values ----------------------------------------------------------------

def _tensor_type(tt: Any) -> tuple[str, tuple[int | None, ...]]:
    dtype = MIL_DTYPES.get(tt.dataType, f"dtype#{tt.dataType}")
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None
                 for d in tt.dimensions)
    return dtype, dims


def value_type(vt: Any) -> tuple[str, tuple[int | None, ...] | None]:
    kind = vt.WhichOneof("type")
    if kind == "tensorType":
        return _tensor_type(vt.tensorType)
    return kind or "unknown", None


class _Decoder:
    """Decodes ``Value`` messages; blob-backed values are read from the package."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.files: dict[Path, BlobFile] = {}

    def blob(self, file_name: str) -> BlobFile:
        if not file_name.startswith(MODEL_PATH_PREFIX):
            raise InputError(file_name, f"a weight path starting with {MODEL_PATH_PREFIX}", repr(file_name))
        path = safe_join(self.model_dir, file_name[len(MODEL_PATH_PREFIX):])
        if path not in self.files:
            self.files[path] = BlobFile(path)
        return self.files[path]

    def decode(self, value: Any, where: str) -> Any:
        kind = value.WhichOneof("value")
        if kind == "blobFileValue":
            dtype, shape = value_type(value.type)
            if shape is None or any(d is None for d in shape):
                raise InputError(where, "a blob value of static tensor type", str(value.type))
            bf = value.blobFileValue
            return self.blob(bf.fileName).read(bf.offset, dtype, shape)  # type: ignore[arg-type]
        if kind == "immediateValue":
            return self._immediate(value.immediateValue, value.type, where)
        raise InputError(where, "an immediate or blob value", kind or "an empty value")

    def _immediate(self, imm: Any, vt: Any, where: str) -> Any:
        kind = imm.WhichOneof("value")
        if kind == "tensor":
            dtype, shape = value_type(vt)
            return tensor_value(imm.tensor, dtype, shape or (), where)
        if kind == "list":
            elem = vt.listType.type
            return [self._immediate(v.immediateValue, elem, where) if v.HasField("immediateValue")
                    else self.decode(v, where) for v in imm.list.values]
        if kind == "tuple":
            return tuple(self.decode(v, where) for v in imm.tuple.values)
        if kind == "dictionary":
            return {self.decode(kv.key, where): self.decode(kv.value, where)
                    for kv in imm.dictionary.values}
        raise InputError(where, "a tensor, list, tuple or dictionary value", kind or "nothing")


def tensor_value(tv: Any, dtype: str, shape: tuple[int | None, ...], where: str = "") -> Any:
    """A ``TensorValue`` -> NumPy (strings -> ``str`` or an object array)."""
    field_name = tv.WhichOneof("value")
    shape_i = tuple(int(d) for d in shape if d is not None) if all(d is not None for d in shape) else None
    if field_name == "bytes":
        arr = decode_raw(tv.bytes.values, dtype, shape_i if shape_i is not None else (-1,), where)
    elif field_name == "strings":
        vals = [s.decode("utf-8") if isinstance(s, bytes) else s for s in tv.strings.values]
        if not shape:
            return vals[0] if vals else ""
        return np.array(vals, dtype=object).reshape(shape_i or (-1,))
    elif field_name is None:
        arr = np.zeros(shape_i or (0,), NUMPY_DTYPES.get(dtype, np.float32))
    else:
        values = getattr(tv, field_name).values
        arr = np.asarray(list(values), dtype=NUMPY_DTYPES.get(dtype, np.float32))
        arr = arr.reshape(shape_i) if shape_i is not None else arr
    return arr


# -- the program ----------------------------------------------------------------------

def load_spec(path: str | Path) -> Any:
    """The ``Model`` protobuf of an ``.mlpackage`` (or ``.mlmodel``), with a one-line error."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "a Core ML model (.mlpackage)", "no such file or folder")
    from exporters.coreml import quiet_coremltools
    try:
        with quiet_coremltools():
            from coremltools.models.utils import load_spec as _load
            return _load(str(path))
    except Exception as exc:  # coremltools raises several kinds for a broken package
        raise InputError(path, "a readable Core ML model package", error_line(exc)) from None


def model_dir(path: str | Path) -> Path:
    """The folder that ``@model_path`` refers to: where ``model.mlmodel`` lies."""
    path = Path(path)
    if path.is_dir():
        import json
        manifest = path / "Manifest.json"
        try:
            info = json.loads(manifest.read_text())
            root_id = info["rootModelIdentifier"]
            rel = info["itemInfoEntries"][root_id]["path"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(manifest, "an .mlpackage Manifest.json naming its root model",
                             error_line(exc)) from None
        return safe_join(path / "Data", rel).parent
    return path.parent


def load_program(path: str | Path, function: str = "main", spec: Any = None) -> Program:
    """Parse the ML Program of ``path``; every const (immediate or blob) decoded."""
    path = Path(path)
    spec = spec if spec is not None else load_spec(path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise InputError(path, "an ML Program (mlprogram) model",
                         f"a {spec.WhichOneof('Type')} model (neural networks are not supported)")
    prog = spec.mlProgram
    if function not in prog.functions:
        raise InputError(path, f"a function {function!r}", f"functions {sorted(prog.functions)}")
    fn = prog.functions[function]
    opset = fn.opset
    if opset not in fn.block_specializations:
        raise InputError(path, f"a block for opset {opset}", f"{sorted(fn.block_specializations)}")
    block = fn.block_specializations[opset]
    dec = _Decoder(model_dir(path))

    inputs = [Var(v.name, *value_type(v.type)) for v in fn.inputs]
    ops: list[Op] = []
    blobs: dict[str, BlobRef] = {}
    for op_pb in block.operations:
        outputs = [Var(o.name, *value_type(o.type)) for o in op_pb.outputs]
        where = f"{path} op {op_pb.type} -> {outputs[0].name if outputs else '?'}"
        if len(op_pb.blocks):
            raise InputError(where, "ops without nested blocks (no control flow)",
                             f"an op with {len(op_pb.blocks)} block(s)")
        attrs = {k: dec.decode(v, where) for k, v in op_pb.attributes.items()}
        for k, v in op_pb.attributes.items():
            if v.WhichOneof("value") == "blobFileValue" and outputs:
                ref = dec.blob(v.blobFileValue.fileName).locate(v.blobFileValue.offset)
                blobs[outputs[0].name if k == "val" else f"{outputs[0].name}:{k}"] = ref
        bound: dict[str, list[str | Literal]] = {}
        for k, arg in op_pb.inputs.items():
            binds: list[str | Literal] = []
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    binds.append(b.name)
                else:
                    binds.append(Literal(dec.decode(b.value, where)))
                    if b.value.WhichOneof("value") == "blobFileValue" and outputs:
                        bf = b.value.blobFileValue
                        blobs[f"{outputs[0].name}:{k}"] = dec.blob(bf.fileName).locate(bf.offset)
            bound[k] = binds
        ops.append(Op(op_pb.type, outputs, bound, attrs))
    return Program(path=path, function=function, opset=opset, spec_version=spec.specificationVersion,
                   inputs=inputs, outputs=list(block.outputs), ops=ops, description=spec.description,
                   blobs=blobs)
