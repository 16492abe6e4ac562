"""Core ML runner: real ``MLModel.predict`` on macOS, the NumPy MIL interpreter elsewhere.

Which one ran is never in doubt: ``label`` says ``coreml (macOS predict, ...)`` or
``coreml (numpy MIL interpreter, Linux)``, and verify reports carry the label. The
backend is chosen by ``platform.system()`` (``backend="auto"``) or forced with
``backend="predict"`` / ``backend="interpreter"`` (the interpreter runs on macOS too,
which is how the interpreter itself is checked against the device).

Inputs follow the runner contract (float32 NCHW, *normalised* as the PyTorch model
expects). For an image-input artifact the manifest records what the app passes (8-bit
NHWC pixels), which is not a quantized tensor: the runner's ``encode_input`` inverts
the normalisation recorded in ``artifact.extra["image_input"]`` back to pixel values,
``pixel = (x * std + mean) / pixel_scale``, in the model's channel order:

* on macOS those pixels are rounded to 8 bits and passed as a PIL image (what Core ML
  accepts for an image input; Core ML reorders RGB to BGR itself when the model says
  BGR). Inputs that came from 8-bit images (every data set, every camera frame)
  survive the round trip exactly; arbitrary float inputs are quantised to 1/255 steps;
* the interpreter is fed the float pixels as they are: the ``ImageType`` scale/bias
  are ordinary ``mul``/``add`` ops at the start of the program, so it computes what
  the program computes on those values.

Intermediates (``infer_intermediates``) are every MIL variable of the program, float32
NCHW as MIL lays them out. ``predict`` exposes only the outputs, so on macOS the
intermediates come from the interpreter and the label says so.

Options: ``backend`` (auto | predict | interpreter), ``compute_units`` (ALL | CPU_ONLY |
CPU_AND_GPU | CPU_AND_NE; predict only).
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from device_tests.runners.base import Runner
from exporters.artifact import Artifact, TensorSpec
from models.errors import InputError

BACKENDS = ("auto", "predict", "interpreter")
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def on_macos() -> bool:
    return platform.system() == "Darwin"


class CoreMLRunner(Runner):
    kind = "coreml"
    formats = ("mlpackage",)
    splits_batch = True

    def __init__(self, backend: str = "auto", compute_units: str = "ALL", **options: Any) -> None:
        super().__init__(backend=backend, compute_units=compute_units, **options)
        if backend not in BACKENDS:
            raise InputError("coreml backend", " | ".join(BACKENDS), repr(backend))
        if compute_units not in COMPUTE_UNITS:
            raise InputError("coreml compute units", " | ".join(COMPUTE_UNITS), repr(compute_units))
        self.backend = ("predict" if on_macos() else "interpreter") if backend == "auto" else backend
        self.compute_units = compute_units
        self.path: Path | None = None
        self._mlmodel: Any = None
        self._interp: Any = None

    # -- loading -----------------------------------------------------------------------

    def load(self, artifact: Artifact, root: str | Path | None = None) -> None:
        self.path = artifact.resolve(root) if root is not None else Path(artifact.path)
        if not self.path.exists():
            raise InputError(self.path, "a Core ML package", "no such file or folder")
        self.artifact = artifact
        if self.backend == "predict":
            if not on_macos():
                raise InputError("coreml backend predict", "macOS (Core ML runs only on Apple platforms)",
                                 f"{platform.system()}; use backend 'interpreter'")
            from exporters.coreml import quiet_coremltools
            with quiet_coremltools():
                import coremltools as ct
            self._mlmodel = ct.models.MLModel(str(self.path),
                                              compute_units=getattr(ct.ComputeUnit, self.compute_units))
        else:
            self._interpreter()

    def _interpreter(self) -> Any:
        if self._interp is None:
            from device_tests.mil_interpreter import MILInterpreter
            from device_tests.mil_program import load_program
            assert self.path is not None, "load() first"
            self._interp = MILInterpreter(load_program(self.path))
        return self._interp

    @property
    def label(self) -> str:
        if self.backend == "predict":
            return (f"coreml (macOS predict, compute units {self.compute_units}; "
                    "intermediates: numpy MIL interpreter)")
        return f"coreml (numpy MIL interpreter, {platform.system() or 'unknown OS'})"

    # -- feeding -------------------------------------------------------------------------

    def encode_input(self, spec: TensorSpec, x: np.ndarray) -> np.ndarray:
        """An image input takes pixels (float, NCHW, model channel order); a tensor input
        is what the base class makes of it."""
        if self._image:
            return self.to_pixels(x)
        return super().encode_input(spec, x)

    def _predict_feed(self, feed: dict[str, np.ndarray]) -> dict[str, Any]:
        if not self._image:
            return feed
        from PIL import Image
        (name, pixels), = feed.items()
        pix = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)[0]     # (C, H, W)
        if self._image["color_layout"] == "GRAYSCALE":
            return {name: Image.fromarray(pix[0], mode="L")}
        hwc = pix.transpose(1, 2, 0)
        if self._image["color_layout"] == "BGR":
            hwc = hwc[..., ::-1]                  # PIL holds RGB; Core ML makes BGR from it
        return {name: Image.fromarray(np.ascontiguousarray(hwc), mode="RGB")}

    # -- running -----------------------------------------------------------------------

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.artifact is not None, "load() first"
        if self.backend == "predict":
            res = self._mlmodel.predict(self._predict_feed(feed))
        else:
            res = self._interpreter().run(feed)
        out = {}
        for spec in self.artifact.outputs:
            if spec.name not in res:
                raise InputError(self.artifact.path, f"an output {spec.name!r}", f"outputs {sorted(res)}")
            out[spec.name] = np.asarray(res[spec.name], np.float32)
        return out

    @classmethod
    def profile(cls, path: str, **kw: Any) -> dict[str, Any]:
        from device_tests.profile import NotProfilable
        raise NotProfilable("Core ML runs only on macOS/iOS; not profiled here")

    def intermediate_names(self) -> list[str]:
        from device_tests.mil_program import NUMPY_DTYPES
        interp = self._interpreter()
        return [n for n in interp.intermediate_names()              # tensors, not the classifier's
                if interp.program.vars[n].shape is not None and interp.program.vars[n].dtype in NUMPY_DTYPES]

    def infer_intermediates(self, inputs: dict[str, np.ndarray],
                            names: list[str] | None = None) -> dict[str, np.ndarray]:
        interp = self._interpreter()
        wanted = names if names is not None else self.intermediate_names()
        parts: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
        for feed in self.feeds(inputs):
            res = interp.run(feed, keep=wanted)
            for n in wanted:
                if n in res:
                    parts[n].append(np.asarray(res[n], np.float32))
        return {n: np.concatenate(v) for n, v in parts.items() if v}

    def close(self) -> None:
        self._mlmodel = None
        self._interp = None
