"""Calibration data: real, preprocessed model inputs for post-training quantization.

One reader feeds every quantizer (TFLite full-integer, ONNX Runtime QDQ, Core ML
activation quantization) so that they all see the same images, preprocessed by the
same reader and function as training and verification (``models.images``).
Activation ranges fitted on random noise are wrong for real images, so no random
source exists here: the exporters ask for calibration data explicitly.

Sources
-------
* ``"mnist"`` / ``"digits"``: the bundled data sets, **train** split (the held-out
  split stays untouched for the accuracy check after quantization).
* a folder: ImageFolder layout (one sub-folder per class; its train split is used)
  or a flat folder of images; or a single image file.
* ``.npy`` / ``.npz``: ``uint8`` raw pixels ``(N, H, W, C)`` or ``(N, H, W)`` are
  preprocessed; floating-point arrays are taken as model inputs that are already
  preprocessed, ``(N, C, H, W)`` exactly as the model wants them. An ``.npz`` holds
  the array under ``images`` (or ``inputs``/``x``/its only key) and optionally
  ``labels`` (or ``y``) for stratified sampling.

Sampling is deterministic: class-stratified when labels are known (every class is
represented even in a small sample), a seeded choice otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from models.errors import InputError
from models.images import Preprocessing, load_images, preprocess

DEFAULT_SAMPLES = 200       # the TFLite/ORT guides suggest 100-500 representative inputs


def load_calibration(source: str | Path, preprocessing: Preprocessing, samples: int | None = DEFAULT_SAMPLES,
                     seed: int = 0) -> np.ndarray:
    """``samples`` model inputs (float32 NCHW, preprocessed) drawn from ``source``.

    ``samples=None`` takes everything. Raises ``InputError`` for anything that is not
    usable calibration data (missing, empty, unreadable, wrong shape or channels).
    """
    if samples is not None and samples < 1:
        raise InputError("calibration samples", "a positive number", str(samples))
    return load_images(source, preprocessing, "train", samples, seed).x


def preprocess_images(images: np.ndarray, preprocessing: Preprocessing,
                      source: str | Path = "images") -> np.ndarray:
    """uint8 NHWC pixels -> the model's float32 NCHW input (``models.images.preprocess``)."""
    return preprocess(images, preprocessing, source)


class CalibrationReader:
    """ONNX Runtime's calibration protocol over an array: ``get_next() -> {name: batch} | None``.

    Works for ``onnxruntime.quantization.quantize_static`` (duck-typed like its
    ``CalibrationDataReader``) and, through ``__iter__``, as a TFLite representative
    dataset when ``layout="NHWC"`` and ``as_list=True``.
    """

    def __init__(self, data: np.ndarray, input_name: str = "input", batch_size: int = 1,
                 layout: str = "NCHW") -> None:
        if data.ndim != 4 or len(data) == 0:
            raise InputError("calibration data", "a non-empty (N, C, H, W) array", f"shape {tuple(data.shape)}")
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, not {layout!r}")
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.input_name = input_name
        self.batch_size = max(1, int(batch_size))
        self.layout = layout
        self._pos = 0

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.data):
            return None
        batch = self.data[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        if self.layout == "NHWC":
            batch = np.ascontiguousarray(batch.transpose(0, 2, 3, 1))
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item
