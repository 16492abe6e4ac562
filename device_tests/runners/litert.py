"""LiteRT (TFLite) interpreter from ``ai_edge_litert``, on this machine's CPU.

Options (``LiteRTRunner(threads=2, xnnpack=False)``):

* ``threads``: interpreter threads (default: LiteRT's own choice).
* ``xnnpack``: ``True`` (default) applies the XNNPACK delegate as an app gets it;
  ``False`` runs TFLite's builtin reference/optimized kernels only. A pair that passes
  without XNNPACK and fails with it pins the divergence on the delegate's kernels.

The edge (``Runner.infer``) converts layouts (the artifact's ``TensorSpec.layout``; NHWC
tensors are transposed to and from NCHW) and quantized dtypes (int8/uint8 inputs are
quantized and outputs dequantized with the tensor's own scale and zero point; where the
manifest does not record them they are read from the model at load), so callers pass
and get float32 NCHW. The ``.tflite`` has a fixed batch of one; a batch of N is run as
N invocations.

Intermediates come from a second interpreter built with
``experimental_preserve_all_tensors=True`` and **without** XNNPACK: tensors inside a
delegated partition are never materialised, so the builtin kernels are the only way to
see every layer. Quantized intermediates are dequantized; 4-D ones (NHWC inside the
graph, ``artifact.extra["intermediate_layout"]``) are returned NCHW.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from device_tests.runners.base import Runner, dequantize_array, with_native
from exporters.artifact import Artifact, TensorSpec, nhwc_to_nchw
from exporters.native_output import captured_native_output
from models.cpu import default_threads
from models.errors import InputError
from models.util import one_line


def _interpreter_cls() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:   # tflite-runtime as a fallback (broken on numpy 2)
        from tflite_runtime.interpreter import Interpreter, OpResolverType  # type: ignore
    return Interpreter, OpResolverType


def _litert_version() -> str:
    from importlib import metadata
    for dist in ("ai-edge-litert", "tflite-runtime"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "?"


class LiteRTRunner(Runner):
    kind = "litert"
    formats = ("tflite",)
    splits_batch = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        threads = options.get("threads")
        self.threads = int(threads) if threads else None
        self._threads_used = 0
        self.xnnpack = bool(options.get("xnnpack", True))
        self.xnnpack_refused: str | None = None     # why XNNPACK could not take this model
        self.path: Path | None = None
        self._model: bytes = b""
        self._interp: Any = None
        self._debug: Any = None
        self._in: list[tuple[TensorSpec, dict[str, Any]]] = []
        self._out: list[tuple[TensorSpec, dict[str, Any]]] = []

    # -- loading ------------------------------------------------------------
    def _make(self, *, debug: bool) -> Any:
        """An interpreter over the model; with XNNPACK unless asked not to (or debugging).

        XNNPACK is applied when tensors are allocated and can refuse a model the builtin
        kernels run (the int8 ShuffleNetV2's channel-split slices fail in its Prepare with
        the pinned LiteRT). LiteRT's own benchmark tool then runs the default kernels, so does
        this runner: it retries without the delegate and says so in its label, rather than
        failing a model that an app would run.
        """
        use_xnnpack = self.xnnpack and not debug and self.xnnpack_refused is None
        try:
            return self._interpreter(use_xnnpack, debug)
        except (ValueError, RuntimeError) as exc:
            found = one_line(exc, 240)
            if not use_xnnpack:
                raise InputError(self.path, "a .tflite model LiteRT can load", found) from None
            self.xnnpack_refused = found
        try:
            return self._interpreter(False, debug)
        except (ValueError, RuntimeError) as exc:
            raise InputError(self.path, "a .tflite model LiteRT can load",
                             one_line(exc, 240)) from None

    def _interpreter(self, use_xnnpack: bool, debug: bool) -> Any:
        Interpreter, OpResolverType = _interpreter_cls()
        resolver = OpResolverType.AUTO if use_xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        with captured_native_output(), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "preserve_all_tensors is for debugging"
            self._threads_used = self.threads or default_threads()      # the free cores, not every core
            it = Interpreter(model_content=self._model, num_threads=self._threads_used,
                             experimental_op_resolver_type=resolver,
                             experimental_preserve_all_tensors=debug)
            it.allocate_tensors()
        return it

    def load(self, artifact: Artifact, root: str | Path | None = None) -> None:
        self.artifact = artifact
        self.path = artifact.resolve(root) if root is not None else Path(artifact.path)
        if not self.path.is_file():
            raise InputError(self.path, "a .tflite model file", "no such file")
        self._model = self.path.read_bytes()
        self.xnnpack_refused = None
        self._interp = self._make(debug=False)
        self._debug = None
        self._in = _pair(self.path, artifact.inputs, self._interp.get_input_details(), "input")
        self._out = _pair(self.path, artifact.outputs, self._interp.get_output_details(), "output")
        self._input_specs = [with_native(s, d["dtype"], *d["quantization"]) for s, d in self._in]
        self._output_specs = [with_native(s, d["dtype"], *d["quantization"]) for s, d in self._out]

    @property
    def label(self) -> str:
        threads = self.threads or f"{self._threads_used or 'auto'} (free cores)"
        if self.xnnpack and self.xnnpack_refused:
            delegate = "XNNPACK refused the model, builtin kernels"
        else:
            delegate = f"XNNPACK {'on' if self.xnnpack else 'off'}"
        return f"LiteRT {_litert_version()} (CPU, {delegate}, threads={threads})"

    # -- running ------------------------------------------------------------
    def _set_inputs(self, it: Any, feed: dict[str, np.ndarray]) -> None:
        for spec, d in self._in:
            it.set_tensor(d["index"], np.ascontiguousarray(feed[spec.name], dtype=d["dtype"]))

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._interp is not None, "load() first"
        self._set_inputs(self._interp, feed)
        self._interp.invoke()
        return {spec.name: self._interp.get_tensor(d["index"]) for spec, d in self._out}

    @classmethod
    def check_file(cls, path: Path) -> None:
        head = path.read_bytes()[:8] if path.is_file() else b""
        if len(head) < 8 or head[4:8] != b"TFL3":
            raise InputError(path, "a TFLite flatbuffer (identifier TFL3)", "a file without it")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            return
        try:
            Interpreter(model_path=str(path))
        except Exception as exc:  # ValueError / RuntimeError from the flatbuffer verifier
            raise InputError(path, "a complete TFLite model", one_line(exc, 160)) from None

    @classmethod
    def profile(cls, path: str, **kw: Any) -> dict[str, Any]:
        from device_tests.profile import profile_litert
        return profile_litert(path, **kw)

    # -- intermediates ------------------------------------------------------
    def intermediate_names(self) -> list[str]:
        """Every op output with a numeric value, in execution order (graph inputs excluded)."""
        from exporters.tflite_ops import graph_ops
        if self._debug is None:
            self._debug = self._make(debug=True)
        details = {t["index"]: t for t in self._debug.get_tensor_details()}
        names = []
        for op in graph_ops(self._model):
            for idx in op["outputs"]:
                t = details.get(idx)
                if t is not None and _is_activation(t):
                    names.append(t["name"])
        return names

    def infer_intermediates(self, inputs: dict[str, np.ndarray],
                            names: list[str] | None = None) -> dict[str, np.ndarray]:
        assert self.artifact is not None, "load() first"
        available = set(self.intermediate_names())
        wanted = [n for n in (names if names is not None else self.intermediate_names()) if n in available]
        if not wanted:
            return {}
        it = self._debug
        by_name = {t["name"]: t for t in it.get_tensor_details()}
        nhwc = self.artifact.extra.get("intermediate_layout", "NHWC") == "NHWC"
        acc: dict[str, list[np.ndarray]] = {k: [] for k in wanted}
        for feed in self.feeds(inputs):
            self._set_inputs(it, feed)
            it.invoke()
            for name in wanted:
                t = by_name[name]
                v = it.get_tensor(t["index"])
                if np.issubdtype(v.dtype, np.integer):
                    v = dequantize_array(v, *t["quantization"])
                v = np.asarray(v, dtype=np.float32)
                acc[name].append(nhwc_to_nchw(v) if (nhwc and v.ndim == 4) else v)
        return {k: np.concatenate(v) for k, v in acc.items()}

    def close(self) -> None:
        self._interp = None
        self._debug = None
        self._model = b""


def _is_activation(t: dict[str, Any]) -> bool:
    dtype = np.dtype(t["dtype"])
    if np.issubdtype(dtype, np.floating):
        return True
    scale = t["quantization"][0]
    return dtype in (np.int8, np.uint8, np.int16) and bool(scale)


def _pair(path: Path | None, specs: list[TensorSpec], details: list[dict[str, Any]], what: str
          ) -> list[tuple[TensorSpec, dict[str, Any]]]:
    """Match the manifest's tensors to the interpreter's by name (by position if renamed)."""
    if len(specs) != len(details):
        raise InputError(path, f"{len(specs)} {what}s as the manifest says", f"{len(details)}")
    by_name = {d["name"]: d for d in details}
    if all(s.name in by_name for s in specs):
        return [(s, by_name[s.name]) for s in specs]
    return list(zip(specs, details))
