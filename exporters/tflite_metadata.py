"""TFLite Metadata for apps: what Android's TFLite Support, the Task Library and
MediaPipe Tasks read from a ``.tflite`` to classify an image without extra code.

The ``tflite-support`` package that normally writes this does not install on the
pinned toolchain (Python 3.11, numpy 2), so the metadata flatbuffer is written here
with the ``flatbuffers`` runtime, table by table, following the schema

    tensorflow/tflite-support: tensorflow_lite_support/metadata/metadata_schema.fbs
    (file identifier "M001"; the tables used exist since schema 1.0.0)

and packed the way ``MetadataPopulator`` does it
(``tensorflow_lite_support/metadata/python/metadata.py``):

1. the metadata flatbuffer becomes one more ``Buffer`` of the model, referenced by a
   ``Metadata`` entry named ``TFLITE_METADATA`` (replaced if present);
2. the associated files (``labels.txt``) are appended to the model file as a zip
   archive (stored, not deflated), so the ``.tflite`` is also a valid zip and
   ``unzip -l model.tflite`` lists the labels.

What goes in follows the Task Library's image-classifier writer
(``metadata_writers/image_classifier.py``/``metadata_info.py``): model name,
description, version, author, license; input tensor with ``ImageProperties``
(colour space, size), a ``NormalizationOptions`` process unit (mean/std in **raw
pixel units**, i.e. applied to 0..255 values) and the min/max stats they imply for
a float input; output tensor with ``FeatureProperties`` and the labels file as a
``TENSOR_AXIS_LABELS`` associated file.

The reader (``read_metadata``) parses the same tables back and extracts the
associated files from the zip, so a round trip checks every field.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import flatbuffers
import numpy as np
from flatbuffers import encode, number_types as N, table, util

from exporters.artifact import ModelCard, Preprocessing

METADATA_NAME = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
MODEL_IDENTIFIER = b"TFL3"
MIN_PARSER_VERSION = "1.0.0"      # what GetMinimumMetadataParserVersion gives for these tables
LABELS_FILE = "labels.txt"

# Enum values of metadata_schema.fbs.
COLOR_SPACES = {"UNKNOWN": 0, "RGB": 1, "GRAYSCALE": 2}
FILE_TYPES = {"UNKNOWN": 0, "DESCRIPTIONS": 1, "TENSOR_AXIS_LABELS": 2, "TENSOR_VALUE_LABELS": 3,
              "TENSOR_AXIS_SCORE_CALIBRATION": 4, "VOCABULARY": 5}
_CONTENT_FEATURE, _CONTENT_IMAGE = 1, 2          # union ContentProperties
_OPTIONS_NORMALIZATION = 1                        # union ProcessUnitOptions


@dataclass
class AssociatedFile:
    name: str
    description: str = ""
    type: str = "UNKNOWN"
    locale: str = ""


@dataclass
class TensorInfo:
    """One input or output tensor's metadata. ``mean``/``std`` are in raw pixel units."""

    name: str
    description: str = ""
    content: str = "feature"                     # "image" | "feature"
    color_space: str = "UNKNOWN"                 # image only: RGB | GRAYSCALE | UNKNOWN
    image_size: tuple[int, int] | None = None    # image only: (width, height)
    mean: list[float] | None = None
    std: list[float] | None = None
    stats_min: list[float] | None = None
    stats_max: list[float] | None = None
    files: list[AssociatedFile] = field(default_factory=list)


@dataclass
class TFLiteMetadata:
    name: str
    description: str = ""
    version: str = ""
    author: str = ""
    license: str = ""
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    min_parser_version: str = MIN_PARSER_VERSION
    subgraph_name: str = ""
    # Contents of the associated files (name -> bytes); written to / read from the zip.
    file_contents: dict[str, bytes] = field(default_factory=dict)

    @property
    def labels(self) -> list[str] | None:
        """The labels of the first output, decoded from its TENSOR_AXIS_LABELS file."""
        for t in self.outputs:
            for f in t.files:
                if f.type == "TENSOR_AXIS_LABELS" and f.name in self.file_contents:
                    return self.file_contents[f.name].decode("utf-8").splitlines()
        return None


def image_classifier_metadata(card: ModelCard, preprocessing: Preprocessing, *, input_name: str,
                              output_name: str, input_dtype: str = "float32",
                              labels: list[str] | None = None, normalised_inside: bool = False
                              ) -> TFLiteMetadata:
    """The metadata of an image classifier, from the manifest's card and preprocessing.

    Our preprocessing is ``(pixel * pixel_scale - mean) / std``; the metadata's is
    ``(pixel - mean') / std'`` on raw pixels, so ``mean' = mean / pixel_scale`` and
    ``std' = std / pixel_scale``. A model that normalises itself (``normalised_inside``,
    the camera-ready uint8 kind) says mean 0 / std 1: the app feeds camera bytes as they are.
    """
    scale = preprocessing.pixel_scale
    mean = [float(m) / scale for m in preprocessing.mean]
    std = [float(s) / scale for s in preprocessing.std]
    order = preprocessing.channel_order
    color = {"RGB": "RGB", "GRAY": "GRAYSCALE"}.get(order, "UNKNOWN")
    h, w = preprocessing.input_size
    desc = (f"Input image to be classified: {h}x{w}, {order}, normalized as (pixel - mean) / std "
            f"on 0..255 pixel values; {preprocessing.resize_note()}.")
    if normalised_inside:
        mean, std = [0.0] * len(mean), [1.0] * len(std)
        desc = (f"Input image to be classified: {h}x{w}, {order}, uint8 pixel values 0..255 as the camera "
                f"gives them (the model normalises them itself); {preprocessing.resize_note()}.")
    stats_min = stats_max = None
    if input_dtype == "float32":      # as the Task Library writer: the range a normalized pixel spans
        stats_min = [(0.0 - m) / s for m, s in zip(mean, std)]
        stats_max = [(255.0 - m) / s for m, s in zip(mean, std)]
    elif input_dtype == "uint8":
        stats_min, stats_max = [0.0], [255.0]
    image = TensorInfo(input_name, desc, "image", color, (int(w), int(h)), _f32(mean), _f32(std),
                       _f32(stats_min), _f32(stats_max))
    files, contents = [], {}
    if labels:
        files.append(AssociatedFile(LABELS_FILE, "Labels for categories that the model can recognize.",
                                    "TENSOR_AXIS_LABELS"))
        contents[LABELS_FILE] = ("\n".join(labels) + "\n").encode("utf-8")
    n = len(labels) if labels else "the"
    out = TensorInfo(output_name, f"Logits (unnormalized scores) of {n} classes.", "feature", files=files)
    return TFLiteMetadata(card.name, card.description, card.version, card.author, card.license,
                          [image], [out], file_contents=contents)


def _f32(values: list[float] | None) -> list[float] | None:
    """The values as the flatbuffer stores them (float32), so written == read back."""
    return None if values is None else [float(v) for v in np.asarray(values, dtype=np.float32)]


# ---------------------------------------------------------------- writing


def build_metadata_buffer(md: TFLiteMetadata) -> bytes:
    """The ``ModelMetadata`` flatbuffer (identifier ``M001``)."""
    b = flatbuffers.Builder(1024)
    sub = _subgraph(b, md)
    strings = {k: _str(b, getattr(md, k)) for k in ("name", "description", "version", "author", "license",
                                                     "min_parser_version")}
    subs = _vector(b, [sub])
    b.StartObject(8)                      # ModelMetadata
    _slot(b, 0, strings["name"])
    _slot(b, 1, strings["description"])
    _slot(b, 2, strings["version"])
    _slot(b, 3, subs)
    _slot(b, 4, strings["author"])
    _slot(b, 5, strings["license"])
    _slot(b, 7, strings["min_parser_version"])
    b.Finish(b.EndObject(), file_identifier=METADATA_IDENTIFIER)
    return bytes(b.Output())


def _subgraph(b: flatbuffers.Builder, md: TFLiteMetadata) -> int:
    ins = _vector(b, [_tensor(b, t) for t in md.inputs])
    outs = _vector(b, [_tensor(b, t) for t in md.outputs])
    name = _str(b, md.subgraph_name)
    b.StartObject(7)                      # SubGraphMetadata
    _slot(b, 0, name)
    _slot(b, 2, ins)
    _slot(b, 3, outs)
    return b.EndObject()


def _tensor(b: flatbuffers.Builder, t: TensorInfo) -> int:
    name, desc = _str(b, t.name), _str(b, t.description)
    content = _content(b, t)
    units = None
    if t.mean is not None and t.std is not None:
        mean, std = _floats(b, t.mean), _floats(b, t.std)
        b.StartObject(2)                  # NormalizationOptions
        b.PrependUOffsetTRelativeSlot(0, mean, 0)
        b.PrependUOffsetTRelativeSlot(1, std, 0)
        norm = b.EndObject()
        b.StartObject(2)                  # ProcessUnit
        b.PrependUint8Slot(0, _OPTIONS_NORMALIZATION, 0)
        b.PrependUOffsetTRelativeSlot(1, norm, 0)
        units = _vector(b, [b.EndObject()])
    stats = None
    if t.stats_min is not None or t.stats_max is not None:
        smax = _floats(b, t.stats_max) if t.stats_max is not None else None
        smin = _floats(b, t.stats_min) if t.stats_min is not None else None
        b.StartObject(2)                  # Stats
        _slot(b, 0, smax)
        _slot(b, 1, smin)
        stats = b.EndObject()
    files = _vector(b, [_file(b, f) for f in t.files]) if t.files else None
    b.StartObject(7)                      # TensorMetadata
    _slot(b, 0, name)
    _slot(b, 1, desc)
    _slot(b, 3, content)
    _slot(b, 4, units)
    _slot(b, 5, stats)
    _slot(b, 6, files)
    return b.EndObject()


def _content(b: flatbuffers.Builder, t: TensorInfo) -> int:
    if t.content == "image":
        size = None
        if t.image_size:
            b.StartObject(2)              # ImageSize
            b.PrependUint32Slot(0, int(t.image_size[0]), 0)
            b.PrependUint32Slot(1, int(t.image_size[1]), 0)
            size = b.EndObject()
        b.StartObject(2)                  # ImageProperties
        b.PrependInt8Slot(0, COLOR_SPACES[t.color_space], 0)
        _slot(b, 1, size)
        props, kind = b.EndObject(), _CONTENT_IMAGE
    elif t.content == "feature":
        b.StartObject(0)                  # FeatureProperties
        props, kind = b.EndObject(), _CONTENT_FEATURE
    else:
        raise ValueError(f"content must be 'image' or 'feature', not {t.content!r}")
    b.StartObject(3)                      # Content
    b.PrependUint8Slot(0, kind, 0)
    b.PrependUOffsetTRelativeSlot(1, props, 0)
    return b.EndObject()


def _file(b: flatbuffers.Builder, f: AssociatedFile) -> int:
    name, desc, locale = _str(b, f.name), _str(b, f.description), _str(b, f.locale)
    b.StartObject(5)                      # AssociatedFile
    _slot(b, 0, name)
    _slot(b, 1, desc)
    b.PrependInt8Slot(2, FILE_TYPES[f.type], 0)
    _slot(b, 3, locale)
    return b.EndObject()


def _str(b: flatbuffers.Builder, s: str | None) -> int | None:
    return b.CreateString(s) if s else None


def _floats(b: flatbuffers.Builder, values: list[float]) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype=np.float32))


def _vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _slot(b: flatbuffers.Builder, slot: int, off: int | None) -> None:
    if off is not None:
        b.PrependUOffsetTRelativeSlot(slot, off, 0)


def populate(model: bytes, md: TFLiteMetadata) -> bytes:
    """``model`` with ``md`` in its ``TFLITE_METADATA`` buffer and its files zipped on the end."""
    from ai_edge_litert import schema_py_generated as fb

    m = fb.ModelT.InitFromPackedBuf(bytearray(strip_associated_files(model)), 0)
    n_in, n_out = len(m.subgraphs[0].inputs), len(m.subgraphs[0].outputs)
    if (len(md.inputs), len(md.outputs)) != (n_in, n_out):
        raise ValueError(f"metadata describes {len(md.inputs)} inputs/{len(md.outputs)} outputs; "
                         f"the model has {n_in}/{n_out}")
    missing = [f.name for t in md.inputs + md.outputs for f in t.files if f.name not in md.file_contents]
    if missing:
        raise ValueError(f"associated files named in the metadata without contents: {missing}")
    buf = fb.BufferT()
    buf.data = np.frombuffer(build_metadata_buffer(md), dtype=np.uint8)
    m.buffers = list(m.buffers or [])
    m.metadata = list(m.metadata or [])
    for entry in m.metadata:
        if _decode(entry.name) == METADATA_NAME:
            m.buffers[entry.buffer] = buf
            break
    else:
        m.buffers.append(buf)
        entry = fb.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(m.buffers) - 1
        m.metadata.append(entry)
    out = pack_model(m)
    if md.file_contents:
        out = append_zip(out, md.file_contents)
    return out


def pack_model(model_t: object) -> bytes:
    """Serialise a ``schema_py_generated.ModelT`` with 16-byte aligned buffers.

    TFLite's schema marks ``Buffer.data`` ``force_align: 16`` (what the converter
    writes, and what kernels reading weights in place expect); the generated Python
    ``Pack`` aligns byte vectors only to 1, so the builder raises it.
    """
    b = _AlignedBuilder(1 << 16)
    b.Finish(model_t.Pack(b), file_identifier=MODEL_IDENTIFIER)
    return bytes(b.Output())


class _AlignedBuilder(flatbuffers.Builder):
    def CreateNumpyVector(self, x):  # noqa: N802 (flatbuffers' naming)
        if isinstance(x, np.ndarray) and x.dtype.itemsize == 1 and x.size:
            self.StartVector(1, x.size, 16)
            payload = x.tobytes(order="C")
            self.head = self.head - len(payload)
            self.Bytes[self.head:self.head + len(payload)] = payload
            self.vectorNumElems = x.size
            return self.EndVector()
        return super().CreateNumpyVector(x)


def append_zip(model: bytes, files: dict[str, bytes]) -> bytes:
    """Append files as a zip archive, as ``MetadataPopulator`` does with ``zipfile`` in
    append mode (so any zip reader opens the model file). Entries carry a fixed
    timestamp: the same model and labels give the same bytes, hence the same sha256."""
    bio = io.BytesIO(model)
    bio.seek(0, io.SEEK_END)
    with zipfile.ZipFile(bio, "a", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return bio.getvalue()


def strip_associated_files(model: bytes) -> bytes:
    """The flatbuffer part of a model file (drops an appended zip, if any)."""
    return model[: _flatbuffer_end(model)]


def _flatbuffer_end(model: bytes) -> int:
    if not zipfile.is_zipfile(io.BytesIO(model)):
        return len(model)
    with zipfile.ZipFile(io.BytesIO(model)) as zf:
        starts = [i.header_offset for i in zf.infolist()]
    return min(starts) if starts else len(model)


# ---------------------------------------------------------------- reading


def associated_files(model: bytes) -> dict[str, bytes]:
    """Files packed on the end of the model (empty if it is not a zip)."""
    bio = io.BytesIO(model)
    if not zipfile.is_zipfile(bio):
        return {}
    with zipfile.ZipFile(bio) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def metadata_buffer(model: bytes) -> bytes | None:
    """The raw ``TFLITE_METADATA`` flatbuffer of a model, or None."""
    from ai_edge_litert import schema_py_generated as fb

    m = fb.Model.GetRootAs(model, 0)
    for i in range(m.MetadataLength()):
        entry = m.Metadata(i)
        if _decode(entry.Name()) == METADATA_NAME:
            return m.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    return None


def read_metadata(model: bytes | str | Path) -> TFLiteMetadata | None:
    """Parse a model's app metadata and associated files; None if it has none."""
    if not isinstance(model, (bytes, bytearray)):
        model = Path(model).read_bytes()
    buf = metadata_buffer(bytes(model))
    if buf is None:
        return None
    md = parse_metadata_buffer(buf)
    md.file_contents = associated_files(bytes(model))
    return md


def parse_metadata_buffer(buf: bytes) -> TFLiteMetadata:
    if not util.BufferHasIdentifier(buf, 0, METADATA_IDENTIFIER):
        raise ValueError("not a TFLite metadata buffer (identifier M001 missing)")
    root = table.Table(buf, encode.Get(N.UOffsetTFlags.packer_type, buf, 0))
    subs = _tables(root, 3)
    sub = subs[0] if subs else None
    return TFLiteMetadata(
        name=_string(root, 0), description=_string(root, 1), version=_string(root, 2),
        author=_string(root, 4), license=_string(root, 5), min_parser_version=_string(root, 7),
        subgraph_name=_string(sub, 0) if sub else "",
        inputs=[_read_tensor(t) for t in _tables(sub, 2)] if sub else [],
        outputs=[_read_tensor(t) for t in _tables(sub, 3)] if sub else [],
    )


def _read_tensor(t: table.Table) -> TensorInfo:
    info = TensorInfo(_string(t, 0), _string(t, 1))
    content = _table(t, 3)
    if content is not None:
        kind = _scalar(content, 0, N.Uint8Flags, 0)
        props = _table(content, 1)
        if kind == _CONTENT_IMAGE and props is not None:
            info.content = "image"
            code = _scalar(props, 0, N.Int8Flags, 0)
            info.color_space = {v: k for k, v in COLOR_SPACES.items()}.get(code, "UNKNOWN")
            size = _table(props, 1)
            if size is not None:
                info.image_size = (_scalar(size, 0, N.Uint32Flags, 0), _scalar(size, 1, N.Uint32Flags, 0))
        elif kind == _CONTENT_FEATURE:
            info.content = "feature"
    for unit in _tables(t, 4):
        if _scalar(unit, 0, N.Uint8Flags, 0) == _OPTIONS_NORMALIZATION:
            opts = _table(unit, 1)
            info.mean, info.std = _float_list(opts, 0), _float_list(opts, 1)
    stats = _table(t, 5)
    if stats is not None:
        info.stats_max, info.stats_min = _float_list(stats, 0), _float_list(stats, 1)
    types = {v: k for k, v in FILE_TYPES.items()}
    info.files = [AssociatedFile(_string(f, 0), _string(f, 1), types.get(_scalar(f, 2, N.Int8Flags, 0), "UNKNOWN"),
                                 _string(f, 3)) for f in _tables(t, 6)]
    return info


def _field(t: table.Table, slot: int) -> int:
    return t.Offset(4 + 2 * slot)


def _string(t: table.Table, slot: int) -> str:
    o = _field(t, slot)
    return t.String(o + t.Pos).decode("utf-8") if o else ""


def _scalar(t: table.Table, slot: int, flags: type, default: int) -> int:
    o = _field(t, slot)
    return int(t.Get(flags, o + t.Pos)) if o else default


def _table(t: table.Table, slot: int) -> table.Table | None:
    o = _field(t, slot)
    return table.Table(t.Bytes, t.Indirect(o + t.Pos)) if o else None


def _tables(t: table.Table | None, slot: int) -> list[table.Table]:
    if t is None:
        return []
    o = _field(t, slot)
    if not o:
        return []
    start = t.Vector(o)
    return [table.Table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(t.VectorLen(o))]


def _float_list(t: table.Table | None, slot: int) -> list[float] | None:
    if t is None:
        return None
    o = _field(t, slot)
    return [float(v) for v in t.GetVectorAsNumpy(N.Float32Flags, o)] if o else None


def _decode(s: bytes | str | None) -> str:
    return s.decode("utf-8") if isinstance(s, bytes) else (s or "")
