"""The reference runner: the PyTorch model itself, eager, float32, on CPU.

It loads the ``pt`` artifact that ``mdeploy export`` writes (the weights as safetensors
with the metadata that rebuilds the architecture), so ``verify`` needs nothing outside
the export folder except, for a ``file.py:factory`` model, that file.

Intermediates are the outputs of every module, captured by forward hooks and keyed by
module call key (``exporters/layer_map.py``): the path for the first call, ``path#k``
for the k-th later call. Hooks clone what they capture: an in-place activation
(``ReLU(inplace=True)``) would otherwise overwrite the convolution output it follows.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from device_tests.runners.base import Runner
from exporters.artifact import Artifact
from exporters.layer_map import call_key


class TorchRunner(Runner):
    """Options: ``dtype`` ``"float32"`` (default) or ``"float64"``. The float64 run is not
    a deployment target: it is exact arithmetic's stand-in, to tell how far fp32 rounding
    alone moves this model's outputs (its outputs are returned as float64).
    ``accumulation``: ``"blocked"`` (default, PyTorch's own kernels) or ``"in-order"``
    (every conv/linear summed one product at a time, as XNNPACK does:
    ``device_tests.accumulation``; slow, for the float64 rule on a few inputs). ``model``: the
    ``file.py:factory`` the user named (``--model``) for an architecture that only code
    defines; the checkpoint's own record of it is never imported."""

    kind = "torch"
    formats = ("pt",)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        dtype = str(options.get("dtype", "float32"))
        if dtype not in ("float32", "float64"):
            from models.errors import InputError
            raise InputError("torch.dtype", "float32 or float64", repr(dtype))
        self.dtype = torch.float64 if dtype == "float64" else torch.float32
        self.accumulation = str(options.get("accumulation", "blocked"))
        if self.accumulation not in ("blocked", "in-order"):
            from models.errors import InputError
            raise InputError("torch.accumulation", "blocked or in-order", repr(self.accumulation))
        self.output_dtype = np.float64 if dtype == "float64" else np.float32
        self.model: torch.nn.Module | None = None
        self.meta: dict[str, Any] = {}
        self._names: list[str] | None = None

    @classmethod
    def from_module(cls, model: torch.nn.Module, artifact: Artifact, **options: Any) -> "TorchRunner":
        """Wrap a model already in memory (tests, the export stage) instead of a file."""
        runner = cls(**options)
        runner.model = model.eval()
        runner.artifact = artifact
        runner._cast()
        return runner

    def _cast(self) -> None:
        if self.model is not None and self.dtype != torch.float32:
            import copy
            self.model = copy.deepcopy(self.model).to(self.dtype)

    def load(self, artifact: Artifact, root: str | Path | None = None) -> None:
        from models.checkpoint import build_model
        path = artifact.resolve(root) if root is not None else Path(artifact.path)
        self.model, self.meta = build_model(self.options.get("model"), checkpoint=path)
        self.artifact, self.path = artifact, path
        self._cast()

    @property
    def label(self) -> str:
        tail = (", float64" if self.dtype == torch.float64 else "") + \
            (", sums in order" if self.accumulation == "in-order" else "")
        return f"torch {torch.__version__} (eager, CPU{tail})"

    def _tensor(self, feed: dict[str, np.ndarray]) -> torch.Tensor:
        if len(feed) != 1:
            raise ValueError(f"the torch runner feeds one input tensor, got {len(feed)}")
        return torch.from_numpy(np.ascontiguousarray(next(iter(feed.values())))).to(self.dtype)

    def _out(self, t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float64 if self.dtype == torch.float64 else torch.float32).clone().numpy()

    def _names_out(self, n: int) -> list[str]:
        specs = self.output_specs
        return [specs[i].name if i < len(specs) else f"output_{i}" for i in range(n)]

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.model is not None, "load() first"
        from device_tests.accumulation import sequential_fp32
        from exporters.onnx import flatten_outputs
        order = sequential_fp32(self.model) if self.accumulation == "in-order" else contextlib.nullcontext()
        with torch.inference_mode(), order:
            outs = flatten_outputs(self.model(self._tensor(feed)))
        return {n: self._out(o) for n, o in zip(self._names_out(len(outs)), outs)}

    def intermediate_names(self) -> list[str]:
        """Module call keys in execution order (found by one forward on a zero input)."""
        if self._names is None:
            assert self.model is not None and self.artifact is not None, "load() first"
            shape = [d if isinstance(d, int) else 1 for d in self.artifact.inputs[0].shape]
            keys: list[str] = []
            self._run_hooked({self.artifact.inputs[0].name: np.zeros(shape, np.float32)},
                             lambda key, out: keys.append(key))
            self._names = keys
        return list(self._names)

    def infer_intermediates(self, inputs: dict[str, np.ndarray],
                            names: list[str] | None = None) -> dict[str, np.ndarray]:
        wanted = set(names) if names is not None else None
        found: dict[str, np.ndarray] = {}

        def keep(key: str, out: torch.Tensor) -> None:
            if wanted is None or key in wanted:
                found[key] = self._out(out)

        self._run_hooked(inputs, keep)
        return found

    def _run_hooked(self, inputs: dict[str, np.ndarray], sink) -> None:
        assert self.model is not None, "load() first"
        calls: dict[str, int] = {}
        handles = []

        def make_hook(path: str):
            def hook(_mod: torch.nn.Module, _args: Any, out: Any) -> None:
                if not isinstance(out, torch.Tensor):   # tuples/dicts: nothing to map
                    return
                i = calls.get(path, 0)
                calls[path] = i + 1
                sink(call_key(path, i), out)
            return hook

        for path, mod in self.model.named_modules():
            if path:                                     # the root's output is the graph output
                handles.append(mod.register_forward_hook(make_hook(path)))
        try:
            (feed,) = self.feeds(inputs)
            with torch.inference_mode():
                self.model(self._tensor(feed))
        finally:
            for h in handles:
                h.remove()

    def close(self) -> None:
        self.model = None
