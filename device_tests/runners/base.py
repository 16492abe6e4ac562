"""The ``Runner`` interface: every runtime takes and returns float NCHW numpy.

As in Polygraphy, runners only *run*; comparing is the comparator's job. A new
runtime is one new subclass, registered by being defined, never an ``if`` elsewhere.

The edge (names, shapes, dtypes, layout, int8 (de)quantization) is implemented once,
here, in ``Runner.infer`` (Polygraphy's ``BaseRunner.infer`` -> ``infer_impl``): a
backend writes only ``_run(feed)``, which takes arrays already in the artifact's own
layout and dtype and returns the runtime's raw outputs. When three runners each
converted by hand they disagreed on the batch rule and on where scale/zero point came
from; one implementation makes every runtime see the same inputs.

A runner may also own a profiler (``Runner.profile``): the latency of a format is
measured by the runtime that runs it, so profiling needs no table keyed by format.

This module is copied to remote devices (``devices/bundle.py``): numpy, the
``Artifact`` record and ``models.errors`` only.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from exporters.artifact import Artifact, TensorSpec, nchw_to_nhwc, nhwc_to_nchw, to_nchw_shape
from models.errors import InputError

_RUNNERS: dict[str, type["Runner"]] = {}


class RuntimeMissing(InputError):
    """The file is sound but the runtime it needs is not on this machine (a ``.pte``
    delegated to Core ML, on Linux): ``verify`` lists it as skipped with this reason,
    never as a pass; elsewhere it is a one-line error like any ``InputError``."""

# Imported on first lookup; a module missing here (the device bundle has no torch) is skipped.
BUILTIN_RUNNERS = ("torch", "onnxruntime", "litert", "coreml", "executorch")
_import_errors: dict[str, str] = {}


class Runner(ABC):
    kind: ClassVar[str]            # "torch", "onnxruntime", "litert", "coreml", "executorch", ...
    formats: ClassVar[tuple[str, ...]] = ()   # artifact formats it can load
    # A runtime whose model has a fixed batch of one (TFLite, Core ML) is fed a batch of
    # N sample by sample; the others take exactly the artifact's static batch.
    splits_batch: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if getattr(cls, "kind", None):
            _RUNNERS[cls.kind] = cls

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.artifact: Artifact | None = None
        self.path: Path | None = None
        self._input_specs: list[TensorSpec] | None = None
        self._output_specs: list[TensorSpec] | None = None
        self.output_dtype: Any = np.float32

    @abstractmethod
    def load(self, artifact: Artifact, root: str | Path | None = None) -> None:
        """Prepare to run ``artifact`` (its path is relative to ``root``, the export folder)."""

    @abstractmethod
    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run of the runtime on ``feed`` (the artifact's layout and dtypes), raw
        outputs keyed by tensor name in the runtime's output order."""

    # -- the edge ---------------------------------------------------------------------

    @property
    def input_specs(self) -> list[TensorSpec]:
        """The inputs as the runtime takes them: the manifest's, completed by the backend
        from the file where the manifest is silent (LiteRT reads scale/zero point there)."""
        if self._input_specs is not None:
            return self._input_specs
        return list(self.artifact.inputs) if self.artifact is not None else []

    @property
    def output_specs(self) -> list[TensorSpec]:
        if self._output_specs is not None:
            return self._output_specs
        return list(self.artifact.outputs) if self.artifact is not None else []

    @property
    def where(self) -> str | Path:
        """What an input error names: the model file."""
        if self.path is not None:
            return self.path
        return self.artifact.path if self.artifact is not None else type(self).__name__

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: float32 NCHW in, float out (NCHW where 4-D), keyed by the
        artifact's tensor names."""
        parts: dict[str, list[np.ndarray]] = {}
        for feed in self.feeds(inputs):
            for name, y in self.decode_outputs(self._run(feed)).items():
                parts.setdefault(name, []).append(y)
        return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}

    def feeds(self, inputs: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """``inputs`` checked and converted to what ``_run`` takes, one feed per run
        (one per sample when the model's batch is fixed at one and the runner splits)."""
        arrays = self._named(inputs)
        self.check_inputs(arrays)
        specs = self.input_specs
        if not specs:
            return [dict(arrays)]
        n = len(arrays[specs[0].name])
        split = any(self._splits(s) for s in specs)
        chunks = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)] if split else [arrays]
        return [{s.name: self.encode_input(s, c[s.name]) for s in specs} for c in chunks]

    def _named(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for spec in self.input_specs:
            if spec.name not in inputs:
                raise InputError("inputs", f"a tensor named {spec.name!r}", f"{sorted(inputs)}")
            out[spec.name] = np.asarray(inputs[spec.name], dtype=np.float32)
        return out

    def _splits(self, spec: TensorSpec) -> bool:
        return self.splits_batch and bool(spec.shape) and spec.shape[0] == 1

    def check_inputs(self, inputs: Mapping[str, np.ndarray], *, batch: bool = True) -> None:
        """Static dims of each input must match the (NCHW) array, before any runtime
        produces a cryptic error. The batch is free where the runner splits batches, or
        when ``batch`` is False (the comparator re-batches to the artifact's own batch)."""
        for spec in self.input_specs:
            if spec.name not in inputs:
                continue
            shape = tuple(np.shape(inputs[spec.name]))
            want = to_nchw_shape(spec.shape, spec.layout)
            free = not batch or self._splits(spec)
            ok = len(want) == len(shape) and all(
                not isinstance(w, int) or (i == 0 and free) or w == s
                for i, (w, s) in enumerate(zip(want, shape)))
            if not ok:
                shown = [("N" if (i == 0 and (free or not isinstance(w, int)))
                          else str(w) if isinstance(w, int) else "?") for i, w in enumerate(want)]
                raise InputError(self.where, f"input {spec.name!r} of shape [{', '.join(shown)}] (NCHW)",
                                 f"shape {list(shape)}")

    @property
    def _image(self) -> dict[str, Any] | None:
        """The pixel-input record (``extra["image_input"]``) of a model that takes pixels
        and normalises them itself (Core ML's image input, TFLite's ``uint8-pixels``)."""
        return (self.artifact.extra.get("image_input") if self.artifact is not None else None) or None

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        """Normalised NCHW -> pixel values (float, model channel order), inverting the
        preprocessing: one inversion for every runtime whose model takes pixels."""
        img = self._image
        assert img is not None
        return to_pixels(x, img["mean"], img["std"], float(img["pixel_scale"]))

    def encode_input(self, spec: TensorSpec, x: np.ndarray) -> np.ndarray:
        """Float NCHW -> the tensor as the model takes it: its layout, its dtype, quantized
        with its own scale and zero point. A model that takes pixels is given the pixels
        the normalised input came from (its uint8 scale 1 then rounds and clips them)."""
        if self._image:
            x = self.to_pixels(x)
        if spec.layout == "NHWC":
            x = nchw_to_nhwc(x)
        dtype = _np_dtype(spec.dtype)
        if np.issubdtype(dtype, np.integer):
            if spec.scale is None or not spec.scale:
                raise InputError(self.where, f"a scale and zero point for the {dtype.name} input "
                                 f"{spec.name!r}", "none")
            return quantize_array(x, float(spec.scale), int(spec.zero_point or 0), dtype.name)
        return np.ascontiguousarray(x, dtype=dtype)

    def decode_output(self, spec: TensorSpec | None, y: np.ndarray) -> np.ndarray:
        """The runtime's output -> float, dequantized, NCHW where the tensor is NHWC."""
        y = np.asarray(y)
        if spec is not None and spec.quantized and np.issubdtype(y.dtype, np.integer):
            y = dequantize_array(y, float(spec.scale), int(spec.zero_point or 0))
        y = np.asarray(y, dtype=self.output_dtype)
        if spec is not None and spec.layout == "NHWC":
            y = nhwc_to_nchw(y)
        return y

    def decode_outputs(self, raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in self.output_specs}
        return {name: self.decode_output(specs.get(name), y) for name, y in raw.items()}

    # -- the rest of the interface ----------------------------------------------------

    def intermediate_names(self) -> list[str]:
        """Names of intermediate tensors this runner can expose, in execution order."""
        return []

    def infer_intermediates(self, inputs: dict[str, np.ndarray],
                            names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Values of intermediate tensors (float, NCHW where 4-D); default: none available."""
        return {}

    @classmethod
    def profile(cls, path: str, *, runs: int, warmup: int, threads: int | None,
                op_profile: bool = True, marker: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Raw measurements of one model file with this runtime (``device_tests.profile``)."""
        from device_tests.profile import NotProfilable
        raise NotProfilable(f"no local profiler for the {cls.kind} runtime")

    @classmethod
    def model_files(cls, path: Path) -> list[Path]:
        """The files a device needs to load the model at ``path`` (to send it elsewhere)."""
        return [Path(path)]

    @classmethod
    def check_file(cls, path: Path) -> None:
        """Parse the model file without running it: a truncated or foreign file is an
        ``InputError`` naming it (before a profile or a device run). Default: no check."""

    @property
    def label(self) -> str:
        """What produced the numbers, for reports (e.g. ``coreml (numpy MIL interpreter)``)."""
        return self.kind

    def close(self) -> None:
        pass

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(np.float32)


def with_native(spec: TensorSpec, dtype: Any, scale: float | None = None,
                zero_point: int | None = None) -> TensorSpec:
    """``spec`` with the dtype the file really has; a quantized tensor keeps the manifest's
    scale/zero point, or takes the file's where the manifest has none."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        return replace(spec, dtype=dtype.name)
    if spec.scale is None and scale:
        return replace(spec, dtype=dtype.name, scale=float(scale), zero_point=int(zero_point or 0))
    return replace(spec, dtype=dtype.name)


def load_builtin_runners() -> dict[str, str]:
    """Import the built-in runner modules (once); returns the ones that could not be
    imported here and why (a device bundle carries only some of them)."""
    for name in BUILTIN_RUNNERS:
        if name in _RUNNERS or name in _import_errors:
            continue
        try:
            importlib.import_module(f"device_tests.runners.{name}")
        except ImportError as exc:
            _import_errors[name] = str(exc)
    return dict(_import_errors)


def runner_class(kind: str) -> type[Runner]:
    if kind not in _RUNNERS:
        load_builtin_runners()
    try:
        return _RUNNERS[kind]
    except KeyError:
        raise KeyError(f"no runner {kind!r}; known: {sorted(_RUNNERS)}") from None


def runner_for_format(fmt: str) -> type[Runner]:
    """The runner class that loads artifacts of format ``fmt``."""
    load_builtin_runners()
    for cls in _RUNNERS.values():
        if fmt in cls.formats:
            return cls
    raise KeyError(f"no runner loads format {fmt!r}")


def runner_for(artifact: Artifact) -> type[Runner]:
    """The runner class that loads this artifact's format."""
    return runner_for_format(artifact.format)


def quantize_array(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """float -> int with the tensor's own scale/zero point, saturating like the runtimes."""
    info = np.iinfo(np.dtype(dtype))
    q = np.round(x / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def to_pixels(x: np.ndarray, mean: Any, std: Any, pixel_scale: float) -> np.ndarray:
    """Normalised NCHW ``(pixel * pixel_scale - mean) / std`` -> pixel (float32)."""
    c = x.shape[1]
    s = np.asarray(std, np.float64).reshape(1, c, 1, 1)
    m = np.asarray(mean, np.float64).reshape(1, c, 1, 1)
    return ((x.astype(np.float64) * s + m) / float(pixel_scale)).astype(np.float32)


def dequantize_array(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)
