"""ONNX Runtime on the CPU execution provider.

Options (``OnnxRuntimeRunner(threads=2, graph_optimization_level="disable")``):

* ``threads``: intra-op threads (default: ORT's own choice, one per core).
* ``graph_optimization_level``: ``disable`` | ``basic`` | ``extended`` | ``all`` (default
  ``all``, what an app gets). A pair that passes at ``disable`` and fails at ``all`` pins
  the divergence on ORT's graph optimizer (a fusion or a layout transform), not on the
  exported graph.

Quantized models (QDQ with int8/uint8 inputs or outputs) are fed and read at the edge
(``Runner.infer``) with the scale and zero point in the artifact's ``TensorSpec`` and
the dtype the session declares, so callers always pass and get float32 NCHW. Intermediates are read by adding the wanted tensors as graph
outputs to a copy of the model: note that ORT will not fuse a node whose output became
a graph output, so the intermediate run can differ from the plain run in the last bits;
the plain ``infer`` is what pass/fail is decided on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from device_tests.runners.base import Runner, dequantize_array, with_native
from exporters.artifact import Artifact
from models.cpu import default_threads, shared
from models.errors import InputError
from models.util import one_line

OPT_LEVELS = ("disable", "basic", "extended", "all")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
              "tensor(uint16)": np.uint16, "tensor(int32)": np.int32, "tensor(int64)": np.int64}
_VALUE_TYPES = (1, 2, 3, 4, 5, 10, 11)   # float, uint8, int8, uint16, int16, float16, double


class OnnxRuntimeRunner(Runner):
    kind = "onnxruntime"
    formats = ("onnx",)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        level = str(options.get("graph_optimization_level", "all")).lower()
        if level not in OPT_LEVELS:
            raise InputError("onnxruntime.graph_optimization_level", f"one of {', '.join(OPT_LEVELS)}",
                             repr(level))
        self.opt_level = level
        threads = options.get("threads")
        self.threads = int(threads) if threads else 0
        self._threads_used = 0
        self.path: Path | None = None
        self.session: Any = None
        self._proto: Any = None
        self._extra_sessions: dict[tuple[str, ...], Any] = {}

    # -- loading ------------------------------------------------------------
    def _session_options(self) -> Any:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[self.opt_level]
        threads = self.threads or default_threads()      # the free cores, not every core
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if shared(threads):     # other work on these cores: workers sleep between ops, not spin
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._threads_used = threads
        so.log_severity_level = 3          # ORT's own warnings would print below pipeline/
        return so

    def _make_session(self, model: str | bytes) -> Any:
        import onnxruntime as ort
        try:
            return ort.InferenceSession(model, self._session_options(),
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:   # ORT raises its own Fail/InvalidProtobuf/... types
            msg = one_line(exc, 240)
            raise InputError(self.path, "an ONNX model that ONNX Runtime can load", msg) from None

    def load(self, artifact: Artifact, root: str | Path | None = None) -> None:
        self.artifact = artifact
        self.path = artifact.resolve(root) if root is not None else Path(artifact.path)
        if not self.path.is_file():
            raise InputError(self.path, "an ONNX model file", "no such file")
        self.session = self._make_session(str(self.path))
        self._check_io_names()
        types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self._input_specs = [with_native(s, types[s.name]) for s in artifact.inputs]

    def _check_io_names(self) -> None:
        """The file must be the one the manifest describes: input names and static dims."""
        assert self.artifact is not None
        have = {i.name: i for i in self.session.get_inputs()}
        for spec in self.artifact.inputs:
            if spec.name not in have:
                raise InputError(self.path, f"an input named {spec.name!r} (as the manifest says)",
                                 f"inputs {sorted(have)}")
            real = list(have[spec.name].shape)
            clash = len(real) != len(spec.shape) or any(
                isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(real, spec.shape))
            if clash:
                raise InputError(self.path, f"input {spec.name!r} of shape {spec.shape} (as the manifest says)",
                                 f"shape {[d if isinstance(d, int) else str(d) for d in real]} in the file")

    @property
    def label(self) -> str:
        import onnxruntime as ort
        threads = self.threads or f"{self._threads_used or 'auto'} (free cores)"
        return f"onnxruntime {ort.__version__} (CPU EP, opt={self.opt_level}, threads={threads})"

    # -- running ------------------------------------------------------------
    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.session is not None, "load() first"
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    @classmethod
    def model_files(cls, path: Path) -> list[Path]:
        """The model and its external-data file, ``<name>.data`` (``exporters.onnx``), if any."""
        data = Path(path).with_name(Path(path).name + ".data")
        return [Path(path), data] if data.exists() else [Path(path)]

    @classmethod
    def check_file(cls, path: Path) -> None:
        from exporters.onnx import load_onnx
        load_onnx(path, load_weights=False)

    @classmethod
    def profile(cls, path: str, **kw: Any) -> dict[str, Any]:
        from device_tests.profile import profile_onnxruntime
        return profile_onnxruntime(path, **kw)

    # -- intermediates ------------------------------------------------------
    def _model_proto(self) -> Any:
        if self._proto is None:
            import onnx

            from exporters.onnx import load_onnx
            proto = load_onnx(self.path)
            try:   # value_info gives the types of the tensors we will expose
                proto = onnx.shape_inference.infer_shapes(proto)
            except Exception:  # a model shape inference cannot handle still runs
                pass
            self._proto = proto
        return self._proto

    def intermediate_names(self) -> list[str]:
        """Outputs of every node with a numeric tensor type, in graph (topological) order."""
        proto = self._model_proto()
        types = _elem_types(proto)
        graph_inputs = {i.name for i in proto.graph.input}
        return [o for n in proto.graph.node for o in n.output
                if o and o not in graph_inputs and types.get(o) in _VALUE_TYPES]

    def infer_intermediates(self, inputs: dict[str, np.ndarray],
                            names: list[str] | None = None) -> dict[str, np.ndarray]:
        import onnx
        available = self.intermediate_names()
        wanted = tuple(n for n in (names if names is not None else available) if n in set(available))
        if not wanted:
            return {}
        session = self._extra_sessions.get(wanted)
        if session is None:
            proto = onnx.ModelProto()
            proto.CopyFrom(self._model_proto())
            types = _elem_types(proto)
            present = {o.name for o in proto.graph.output}
            for n in wanted:
                if n not in present:
                    proto.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
            session = self._make_session(proto.SerializeToString())
            self._extra_sessions = {wanted: session}      # keep one: they hold a model copy
        (feed,) = self.feeds(inputs)
        values = session.run(list(wanted), feed)
        qparams = _quantize_params(self._model_proto())
        out = {}
        for n, v in zip(wanted, values):
            if np.issubdtype(v.dtype, np.integer):
                if n not in qparams:
                    continue                                  # an index/shape tensor, not an activation
                v = dequantize_array(v, *qparams[n])
            out[n] = np.asarray(v, dtype=np.float32)
        return out

    def close(self) -> None:
        self.session = None
        self._proto = None
        self._extra_sessions = {}


def _elem_types(proto: Any) -> dict[str, int]:
    g = proto.graph
    return {v.name: v.type.tensor_type.elem_type
            for v in list(g.value_info) + list(g.output) + list(g.input) if v.type.HasField("tensor_type")}


def _quantize_params(proto: Any) -> dict[str, tuple[float, int]]:
    """Scale and zero point of every QuantizeLinear output with per-tensor parameters."""
    from onnx import numpy_helper
    inits = {t.name: t for t in proto.graph.initializer}
    consts = {n.output[0]: next((a.t for a in n.attribute if a.name == "value"), None)
              for n in proto.graph.node if n.op_type == "Constant"}

    def value(name: str) -> np.ndarray | None:
        t = inits.get(name) or consts.get(name)
        return None if t is None else numpy_helper.to_array(t)

    out = {}
    for n in proto.graph.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 2:
            continue
        scale = value(n.input[1])
        zp = value(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros((), np.int64)
        if scale is not None and zp is not None and scale.size == 1 and zp.size == 1:
            out[n.output[0]] = (float(scale.reshape(())), int(zp.reshape(())))
    return out
