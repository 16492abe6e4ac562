"""The ``Runner`` interface: every runtime takes and returns float NCHW numpy.

As in Polygraphy, runners only *run*; comparing is the comparator's job. A new
runtime is one new subclass registered here, never an ``if`` elsewhere. Each runner
converts layout (NHWC) and quantized dtypes (int8/uint8 with scale/zero point) at
its edge, so the comparator never needs to know what the artifact looks like.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from exporters.artifact import Artifact

_RUNNERS: dict[str, type["Runner"]] = {}


class Runner(ABC):
    kind: ClassVar[str]            # "torch", "onnxruntime", "litert", "coreml", ...
    formats: ClassVar[tuple[str, ...]] = ()   # artifact formats it can load

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if getattr(cls, "kind", None):
            _RUNNERS[cls.kind] = cls

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.artifact: Artifact | None = None

    @abstractmethod
    def load(self, artifact: Artifact, root: str | Path | None = None) -> None:
        """Prepare to run ``artifact`` (its path is relative to ``root``, the export folder)."""

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: float32 NCHW in, float32 out, keyed by the artifact's tensor names."""

    def intermediate_names(self) -> list[str]:
        """Names of intermediate tensors this runner can expose, in execution order."""
        return []

    def infer_intermediates(self, inputs: dict[str, np.ndarray],
                            names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Values of intermediate tensors (float, NCHW where 4-D); default: none available."""
        return {}

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


def runner_class(kind: str) -> type[Runner]:
    import device_tests.runners  # noqa: F401  (registers the built-in runners)
    try:
        return _RUNNERS[kind]
    except KeyError:
        raise KeyError(f"no runner {kind!r}; known: {sorted(_RUNNERS)}") from None


def runner_for(artifact: Artifact) -> type[Runner]:
    """The runner class that loads this artifact's format."""
    import device_tests.runners  # noqa: F401
    for cls in _RUNNERS.values():
        if artifact.format in cls.formats:
            return cls
    raise KeyError(f"no runner loads format {artifact.format!r}")


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x


def quantize_array(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """float -> int with the tensor's own scale/zero point, saturating like the runtimes."""
    info = np.iinfo(np.dtype(dtype))
    q = np.round(x / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_array(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)
