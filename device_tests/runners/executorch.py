"""ExecuTorch programs (``.pte``) through ``executorch.runtime``, on this machine's CPU.

The runtime is the one an app links (its Python binding over the same C++ runtime, with
the XNNPACK delegate and the portable CPU kernels compiled in): ops inside an XNNPACK
subgraph run on XNNPACK, the rest on ExecuTorch's own kernels, as on a phone.

Options (``ExecuTorchRunner(threads=2)``):

* ``threads``: size of ExecuTorch's thread pool, which XNNPACK runs on (default: the free
  cores, ``models.cpu.default_threads``, as the other runners). The pool is process-wide;
  the Python binding can only reset it (``_unsafe_reset_threadpool``, experimental), so
  the last runner loaded in a process decides it; the label says the count in use.

The edge (``Runner.infer``) checks names and shapes; a ``.pte`` has a fixed batch of one,
so a batch of N is run as N calls. Inputs and outputs are float32 NCHW for fp32 and int8
programs alike (int8 quantizes inside the delegate).

Intermediates come from the artifact's *tap program* (``model_fp32.taps.pte`` beside it,
``exporters/executorch_taps.py``): the same graph, lowered the same way, with each
module's output as a program output, named ``tap_<i>`` in the manifest's layer map. Inside
the shipped program's XNNPACK delegate no intermediate tensor exists (and ETDump stops at
the delegate boundary), so this is how the first-divergent-layer search sees a ``.pte``'s
layers. An export without taps (``--no-executorch-taps``) has none, and the search says so.

A program delegated to a backend this runtime lacks (``Backend CoreMLBackend is not
registered``: Core ML is linked only into Apple builds) is not run by ExecuTorch here.
When the whole program is one Core ML delegate, its payload (the ``model.mlpackage`` the
``CoreMLPartitioner`` converted, stored flattened in the ``.pte``) is unpacked and run on
the NumPy MIL interpreter that runs ``.mlpackage`` files on Linux (``runners/coreml.py``),
and the label says so: the numbers are the Core ML program's, not the ExecuTorch runtime's.
Otherwise (ops outside the delegate, MIL ops the interpreter lacks: int8's quantize) the
load raises ``RuntimeMissing``, which verify reports as a skip with its reason; a profile
is ``NotProfilable`` with the same reason.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from device_tests.runners.base import Runner, RuntimeMissing, with_native
from exporters.artifact import Artifact
from models.cpu import default_threads
from models.errors import InputError

EXPECTED = "an ExecuTorch program (.pte) the runtime can load"


def _runtime() -> Any:
    from exporters.native_output import quiet
    with quiet():
        from executorch.runtime import Runtime
        return Runtime.get()


def _load_method(path: Path) -> Any:
    """Program and method loaded (the XNNPACK delegate initialises here); a truncated or
    foreign file is an ``InputError`` naming it, with the runtime's own reason."""
    from exporters.executorch import METHOD, runtime_call
    runtime = _runtime()
    program = runtime_call(lambda: runtime.load_program(str(path)), path, EXPECTED)
    if METHOD not in program.method_names:
        raise InputError(path, f"a program with a {METHOD!r} method", f"methods {sorted(program.method_names)}")
    return runtime_call(lambda: program.load_method(METHOD), path, EXPECTED)


def missing_backends(path: Path) -> list[str]:
    """Delegate backends of the program at ``path`` that this runtime has not registered
    ([] for a file that does not parse: its load error says more)."""
    from exporters.executorch import program_delegates
    try:
        backends = program_delegates(path.read_bytes())["backends"]
    except Exception:  # a truncated or foreign file: not this question
        return []
    registry = _runtime().backend_registry
    return [b for b in dict.fromkeys(backends) if not registry.is_available(b)]


def _apple_only(path: Path, missing: list[str]) -> str:
    return (f"delegated to {', '.join(missing)}, which this ExecuTorch runtime does not have "
            f"(registered: {', '.join(_runtime().backend_registry.registered_backend_names)}); "
            "a Core ML .pte runs only on iOS/macOS")


class _CoreMLPayload:
    """A fully Core ML-delegated program's ``model.mlpackage``, unpacked to a temporary
    folder and run on the NumPy MIL interpreter (inputs and outputs by position: the
    program's are the delegate's)."""

    def __init__(self, path: Path, missing: list[str]) -> None:
        import tempfile

        from exporters.executorch import program_delegates
        info = program_delegates(path.read_bytes())
        whole = (missing == ["CoreMLBackend"] and info["backends"] == ["CoreMLBackend"]
                 and not info["operators"] and info["payloads"][0] is not None)
        if not whole:
            raise RuntimeMissing(path, "a program this ExecuTorch runtime can run",
                                 _apple_only(path, missing) + (f"; kernel ops {info['operators']} outside the "
                                                               "delegate, so its payload alone is not the program"
                                                               if info["operators"] else ""))
        from device_tests.mil_interpreter import MILInterpreter
        from device_tests.mil_program import load_program
        from exporters.native_output import quiet
        with quiet():
            from executorch.backends.apple.coreml import executorchcoreml
        self._tmp = tempfile.TemporaryDirectory(prefix="pte_coreml_")
        folder = Path(self._tmp.name) / "payload"
        folder.mkdir()
        if not executorchcoreml.unflatten_directory_contents(info["payloads"][0], str(folder)):
            self._tmp.cleanup()
            raise RuntimeMissing(path, "a Core ML delegate payload (a flattened model.mlpackage)",
                                 "one that does not unpack")
        try:
            with quiet():     # coremltools' import logs (TensorFlow's, oneDNN's) to the descriptors
                self.interpreter = MILInterpreter(load_program(folder / "lowered_module" / "model.mlpackage"))
        except InputError as exc:      # e.g. int8's quantize/dequantize: ops the interpreter lacks
            self._tmp.cleanup()
            raise RuntimeMissing(path, "a program this ExecuTorch runtime can run",
                                 f"{_apple_only(path, missing)}; its Core ML payload does not run on the "
                                 f"NumPy MIL interpreter either ({exc.found})") from None

    def run(self, feed: list[np.ndarray]) -> list[np.ndarray]:
        program = self.interpreter.program
        res = self.interpreter.run({v.name: x for v, x in zip(program.inputs, feed)})
        return [np.asarray(res[name], np.float32) for name in program.outputs]

    def close(self) -> None:
        self._tmp.cleanup()


class ExecuTorchRunner(Runner):
    kind = "executorch"
    formats = ("executorch",)
    splits_batch = True              # the program's batch is fixed (at one, as exported)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        threads = options.get("threads")
        self.threads = int(threads) if threads else None
        self._threads_used = 0
        self._method: Any = None
        self._pool = -1                  # executorch_pool_generation() when the method was loaded
        self._payload: _CoreMLPayload | None = None    # a Core ML program this runtime cannot run
        self._taps: Any = None                           # the tap program's method, loaded on first use
        self._taps_pool = -1

    def load(self, artifact: Artifact, root: str | Path | None = None) -> None:
        from device_tests.profile import EXECUTORCH_DTYPES, executorch_pool_generation, executorch_threads
        self.artifact = artifact
        self.path = artifact.resolve(root) if root is not None else Path(artifact.path)
        if not self.path.is_file():
            raise InputError(self.path, "an ExecuTorch .pte file", "no such file")
        # the pool first: a method keeps the pool it was loaded with (see _current_method)
        self._threads_used = executorch_threads(self.threads or default_threads())
        try:
            self._method, self._pool = _load_method(self.path), executorch_pool_generation()
        except InputError:
            missing = missing_backends(self.path)
            if not missing:
                raise
            self._payload = _CoreMLPayload(self.path, missing)
            self._input_specs = list(artifact.inputs)
            return
        meta = self._method.metadata
        infos = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
        if len(infos) != len(artifact.inputs) or meta.num_outputs() < len(artifact.outputs):
            raise InputError(self.path, f"{len(artifact.inputs)} input(s) and {len(artifact.outputs)} output(s) "
                             "as the manifest says", f"{len(infos)} and {meta.num_outputs()}")
        for spec, info in zip(artifact.inputs, infos):
            real = list(info.sizes())
            if len(real) != len(spec.shape) or any(isinstance(s, int) and s != r for s, r in zip(spec.shape, real)):
                raise InputError(self.path, f"input {spec.name!r} of shape {spec.shape} (as the manifest says)",
                                 f"shape {real} in the file")
        self._input_specs = [with_native(s, EXECUTORCH_DTYPES.get(i.dtype(), np.float32))
                             for s, i in zip(artifact.inputs, infos)]

    @property
    def label(self) -> str:
        from exporters.executorch import executorch_version
        if self._payload is not None:
            return (f"ExecuTorch {executorch_version()} .pte's Core ML delegate payload (model.mlpackage) on the "
                    f"numpy MIL interpreter ({platform.system() or 'unknown OS'}; this runtime has no "
                    "CoreMLBackend)")
        threads = self.threads or f"{self._threads_used or 'auto'} (free cores)"
        return f"ExecuTorch {executorch_version()} (CPU, XNNPACK delegate + portable kernels, threads={threads})"

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from exporters.executorch import runtime_call
        names = [s.name for s in self.output_specs]
        if self._payload is not None:
            return dict(zip(names, self._payload.run([feed[s.name] for s in self.input_specs])))
        method = self._current_method()
        inputs = [torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in self.input_specs]
        outs = runtime_call(lambda: method.execute(inputs), self.where, "inputs the program accepts",
                            running=True)
        return {name: y.detach().numpy() for name, y in zip(names, outs)}

    def _current_method(self) -> Any:
        """The loaded method, reloaded if another runner or a profile has reset ExecuTorch's
        process-wide pool since: XNNPACK keeps a pointer to the pool it was initialised with,
        and executing on a reset pool aborted the process (``__pthread_tpp_change_priority``
        assertion, or a segfault)."""
        from device_tests.profile import executorch_pool_generation
        assert self._method is not None, "load() first"
        if self._pool != executorch_pool_generation():
            self._method = None                           # the stale one goes first
            self._method, self._pool = _load_method(self.path), executorch_pool_generation()
        return self._method

    # -- intermediates: the tap program --------------------------------------------------
    def _taps_file(self) -> Path | None:
        from exporters.executorch_taps import taps_path
        if self.artifact is None or self.path is None or not self.artifact.extra.get("layer_map"):
            return None
        path = taps_path(self.path)          # derived from the .pte's own name, never read from the manifest
        return path if path.is_file() else None

    def intermediate_names(self) -> list[str]:
        """``tap_<i>`` in execution order, when the artifact has its tap program."""
        if self._payload is not None or self._taps_file() is None:
            return []
        assert self.artifact is not None
        return list(self.artifact.extra["layer_map"])

    def infer_intermediates(self, inputs: dict[str, np.ndarray],
                            names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The tap program run on ``inputs`` (one call per sample: its batch is one too);
        output ``len(outputs) + i`` is ``tap_<i>``, float32 NCHW as PyTorch's."""
        import torch

        from device_tests.profile import executorch_pool_generation
        from exporters.executorch import runtime_call
        order = self.intermediate_names()
        path = self._taps_file()
        if not order or path is None:
            return {}
        index = {name: len(self.output_specs) + i for i, name in enumerate(order)}
        wanted = [n for n in (names if names is not None else order) if n in index]
        if self._taps is None or self._taps_pool != executorch_pool_generation():
            self._taps = None                  # a stale method goes first (see _current_method)
            self._taps, self._taps_pool = _load_method(path), executorch_pool_generation()
        parts: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
        for feed in self.feeds(inputs):
            xs = [torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in self.input_specs]
            outs = runtime_call(lambda: self._taps.execute(xs), path, "inputs the tap program accepts",
                                running=True)
            for n in wanted:
                parts[n].append(outs[index[n]].detach().numpy().copy())
        return {n: np.concatenate(v) for n, v in parts.items()}

    @classmethod
    def check_file(cls, path: Path) -> None:
        head = path.read_bytes()[:8] if path.is_file() else b""
        if len(head) < 8 or head[4:6] != b"ET":
            raise InputError(path, "an ExecuTorch program (file identifier ET..)", "a file without it")
        try:
            _load_method(path)
        except InputError:
            if not missing_backends(path):   # a program this runtime lacks the backend for is sound
                raise

    @classmethod
    def profile(cls, path: str, **kw: Any) -> dict[str, Any]:
        from device_tests.profile import NotProfilable, ProfileError, profile_executorch
        try:
            return profile_executorch(path, **kw)
        except ProfileError:
            missing = missing_backends(Path(path))
            if missing:
                raise NotProfilable(f"{Path(path).name}: {_apple_only(Path(path), missing)}; "
                                    "not profiled here") from None
            raise

    def close(self) -> None:
        self._method = None
        self._taps = None
        if self._payload is not None:
            self._payload.close()
            self._payload = None
