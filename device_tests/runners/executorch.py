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
programs alike (int8 quantizes inside the delegate). Intermediates are not exposed: tensors
inside a delegate are never materialised, and ETDump's intermediate outputs are not wired
in, so the first-divergent-layer search has nothing to compare for a ``.pte`` (its note
says so).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from device_tests.runners.base import Runner, with_native
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

    def load(self, artifact: Artifact, root: str | Path | None = None) -> None:
        from device_tests.profile import EXECUTORCH_DTYPES, executorch_pool_generation, executorch_threads
        self.artifact = artifact
        self.path = artifact.resolve(root) if root is not None else Path(artifact.path)
        if not self.path.is_file():
            raise InputError(self.path, "an ExecuTorch .pte file", "no such file")
        # the pool first: a method keeps the pool it was loaded with (see _current_method)
        self._threads_used = executorch_threads(self.threads or default_threads())
        self._method, self._pool = _load_method(self.path), executorch_pool_generation()
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
        threads = self.threads or f"{self._threads_used or 'auto'} (free cores)"
        return f"ExecuTorch {executorch_version()} (CPU, XNNPACK delegate + portable kernels, threads={threads})"

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from exporters.executorch import runtime_call
        method = self._current_method()
        inputs = [torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in self.input_specs]
        outs = runtime_call(lambda: method.execute(inputs), self.where, "inputs the program accepts",
                            running=True)
        names = [s.name for s in self.output_specs]
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

    @classmethod
    def check_file(cls, path: Path) -> None:
        head = path.read_bytes()[:8] if path.is_file() else b""
        if len(head) < 8 or head[4:6] != b"ET":
            raise InputError(path, "an ExecuTorch program (file identifier ET..)", "a file without it")
        _load_method(path)

    @classmethod
    def profile(cls, path: str, **kw: Any) -> dict[str, Any]:
        from device_tests.profile import profile_executorch
        return profile_executorch(path, **kw)

    def close(self) -> None:
        self._method = None
