"""What an export leaves behind: ``Artifact`` records gathered in a ``manifest.json``.

The manifest is the contract between the exporters and everything downstream
(runners, verify, quantize, profile, the phone app): it says how to feed each
file (shape, dtype, layout, quantization), how the input was normalised at
training time, and which tool versions produced it, so a result can be
reproduced and a file can be checked against its hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from models.errors import InputError
from models.images import Preprocessing  # noqa: F401  (defined with the one function applying it)
from models.util import error_line
from models.util import layout_for_ndim  # noqa: F401  (re-exported: exporters' one layout rule)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

FORMATS = ("onnx", "tflite", "mlpackage", "executorch", "pt")
LAYOUTS = ("NCHW", "NHWC", "NC", "ANY")


@dataclass
class TensorSpec:
    """One input or output of an artifact; dynamic dims are strings (``"batch"``)."""

    name: str
    shape: list[int | str]
    dtype: str = "float32"
    layout: str = "NCHW"
    scale: float | None = None
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None


def to_nchw_shape(shape: list[int | str], layout: str) -> list[int | str]:
    """A recorded shape in NCHW order, which is how every runner takes inputs."""
    shape = list(shape)
    if layout == "NHWC" and len(shape) == 4:
        return [shape[0], shape[3], shape[1], shape[2]]
    return shape


def nhwc_to_nchw(x: Any) -> Any:
    """A 4-D numpy array NHWC -> NCHW (contiguous); other ranks unchanged."""
    import numpy as np
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x


def nchw_to_nhwc(x: Any) -> Any:
    import numpy as np
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x


def check_calibration(x: Any, shape: Sequence[int | str]) -> Any:
    """Calibration inputs checked against a model input of ``shape`` (N, C, H, W): a
    non-empty 4-D array of finite floats, ``shape`` but for N; returned as contiguous
    float32. Anything else is an ``InputError`` saying the shape or dtype found."""
    import numpy as np
    x = np.asarray(x)
    if x.ndim != 4 or list(x.shape[1:]) != list(shape[1:]) or len(x) == 0:
        raise InputError("calibration", f"float32 model inputs of shape (N, {', '.join(map(str, shape[1:]))})",
                         f"shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise InputError("calibration", "finite floating-point model inputs", f"dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class Artifact:
    """A file the pipeline produced. ``path`` is relative to the manifest's folder."""

    path: str
    format: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sha256: str = ""
    size_bytes: int = 0
    tool: str = ""
    tool_version: str = ""
    variant: str = ""          # e.g. "image-input", "classifier", "qnn-w8a16"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A short unique label for reports: ``onnx/fp32``, ``tflite/int8-io``."""
        tail = f"-{self.variant}" if self.variant else ""
        return f"{self.format}/{self.precision}{tail}"

    def resolve(self, root: str | Path) -> Path:
        return safe_join(root, self.path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Artifact":
        d = dict(d)
        d["inputs"] = [TensorSpec(**t) for t in d.get("inputs", [])]
        d["outputs"] = [TensorSpec(**t) for t in d.get("outputs", [])]
        return cls(**d)


@dataclass
class ModelCard:
    """What an app store / model viewer shows: written into TFLite and Core ML metadata."""

    name: str
    description: str = ""
    version: str = "1.0"
    author: str = ""
    license: str = ""


@dataclass
class Manifest:
    model: str
    preprocessing: Preprocessing
    card: ModelCard | None = None
    artifacts: list[Artifact] = field(default_factory=list)
    labels: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)    # checkpoint, factory, reparam, ...
    versions: dict[str, str] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION
    # values nobody gave (defaults the export guessed: size, mean/std, labels), one line each
    assumed: list[str] = field(default_factory=list)

    def find(self, fmt: str | None = None, precision: str | None = None) -> list[Artifact]:
        return [a for a in self.artifacts
                if (fmt is None or a.format == fmt) and (precision is None or a.precision == precision)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["preprocessing"] = Preprocessing.from_dict(d["preprocessing"])
        if d.get("card"):
            d["card"] = ModelCard(**d["card"])
        d["artifacts"] = [Artifact.from_dict(a) for a in d.get("artifacts", [])]
        return cls(**d)

    def save(self, folder: str | Path) -> Path:
        from exporters.fileio import atomic_write_text
        path = Path(folder) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST_NAME if folder.is_dir() else folder
        if not path.exists():
            raise InputError(path, f"an export folder with {MANIFEST_NAME}", "no such file")
        try:
            manifest = cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError,
                UnicodeDecodeError) as exc:
            raise InputError(path, "a valid mdeploy manifest", error_line(exc)) from None
        manifest.check(path)
        return manifest

    def check(self, source: str | Path) -> None:
        """Every value downstream code indexes, multiplies or joins into a path has its type
        and range: a manifest is input (it may come from anywhere), so a bad value is a
        one-line error here rather than a traceback three stages later."""
        def bad(field: str, expected: str, value: Any) -> InputError:
            return InputError(source, f"{field}: {expected}", repr(value)[:60])

        def count(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 100_000

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

        pre = self.preprocessing
        if not (isinstance(pre.input_size, list) and len(pre.input_size) == 2 and all(map(count, pre.input_size))):
            raise bad("preprocessing.input_size", "[H, W] of positive integers", pre.input_size)
        for name in ("mean", "std"):
            v = getattr(pre, name)
            if not (isinstance(v, list) and v and all(map(number, v))):
                raise bad(f"preprocessing.{name}", "a list of numbers", v)
        if not all(x != 0 for x in pre.std):
            raise bad("preprocessing.std", "non-zero numbers", pre.std)
        if pre.channel_order not in ("RGB", "BGR", "GRAY"):
            raise bad("preprocessing.channel_order", "RGB, BGR or GRAY", pre.channel_order)
        if not number(pre.pixel_scale) or pre.pixel_scale <= 0:
            raise bad("preprocessing.pixel_scale", "a positive number", pre.pixel_scale)
        if not isinstance(self.model, str):
            raise bad("model", "a string", self.model)
        if self.labels is not None and not (isinstance(self.labels, list)
                                            and all(isinstance(x, str) for x in self.labels)):
            raise bad("labels", "a list of strings", self.labels)
        if not isinstance(self.source, dict):
            raise bad("source", "a mapping", self.source)
        for i, a in enumerate(self.artifacts):
            for name in ("path", "format", "precision", "variant"):
                if not isinstance(getattr(a, name), str) or (name == "path" and not a.path):
                    raise bad(f"artifacts[{i}].{name}", "a string", getattr(a, name))
            if os.path.isabs(a.path) or ".." in Path(a.path).parts or "\0" in a.path:
                raise bad(f"artifacts[{i}].path", "a path inside the export folder", a.path)
            for t in (*a.inputs, *a.outputs):
                if not (isinstance(t.name, str) and isinstance(t.shape, list)
                        and all(count(d) or (isinstance(d, str) and d) for d in t.shape)):
                    raise bad(f"artifacts[{i}] tensor", "a name and a shape of positive sizes", t.shape)
                if t.scale is not None and (not number(t.scale) or t.scale <= 0):
                    raise bad(f"artifacts[{i}] tensor {t.name} scale", "a positive number", t.scale)


def sha256_of(path: str | Path) -> str:
    """Hash of a file, or of a directory bundle (``.mlpackage``) in sorted path order."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_of(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def safe_join(root: str | Path, rel: str | Path) -> Path:
    """Join ``rel`` under ``root`` and refuse anything that escapes it (``../``, absolute)."""
    root_r = Path(root).resolve()
    target = (root_r / rel).resolve()
    if target != root_r and root_r not in target.parents:
        raise InputError(rel, f"a path inside {root_r}", "a path that escapes it")
    return target


def library_versions(names: tuple[str, ...] = ("torch", "onnx", "onnxruntime", "tensorflow",
                                               "ai-edge-litert", "coremltools", "onnx2tf", "executorch",
                                               "torchao", "numpy")
                     ) -> dict[str, str]:
    """Installed versions of the tools that shape an artifact, for the manifest."""
    from importlib import metadata
    out = {"python": platform.python_version(), "platform": f"{platform.system()}-{platform.machine()}"}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    if "tensorflow" not in out:
        try:
            out["tensorflow"] = metadata.version("tensorflow-cpu")
        except metadata.PackageNotFoundError:
            pass
    out["mdeploy"] = _own_version()
    return out


def _own_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("mdeploy")
    except metadata.PackageNotFoundError:
        return os.environ.get("MDEPLOY_VERSION", "0+unknown")
