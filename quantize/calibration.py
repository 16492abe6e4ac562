"""Calibration data: real, preprocessed model inputs for post-training quantization.

One reader feeds every quantizer (TFLite full-integer, ONNX Runtime QDQ, Core ML
activation quantization) so that they all see the same images, preprocessed by the
same function as training and verification (``models.datasets.to_model_input``).
Activation ranges fitted on random noise are wrong for real images, so no random
source exists here: the exporters ask for calibration data explicitly.

Sources
-------
* ``"mnist"`` / ``"digits"``: the bundled data sets, **train** split (the held-out
  split stays untouched for the accuracy check after quantization).
* a folder: ImageFolder layout (one sub-folder per class; its train split is used)
  or a flat folder of images.
* ``.npy`` / ``.npz``: ``uint8`` raw pixels ``(N, H, W, C)`` or ``(N, H, W)`` are
  preprocessed; floating-point arrays are taken as model inputs that are already
  preprocessed, ``(N, C, H, W)`` exactly as the model wants them. An ``.npz`` holds
  the array under ``images`` (or ``inputs``/``x``/its only key) and optionally
  ``labels`` for stratified sampling.

Sampling is deterministic: class-stratified when labels are known (every class is
represented even in a small sample), a seeded choice otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from exporters.artifact import Preprocessing
from models.datasets import (BUNDLED, IMAGE_SUFFIXES, ImageSet, _stratified_pick, load_dataset,
                             to_model_input)
from models.errors import InputError

DEFAULT_SAMPLES = 200       # the TFLite/ORT guides suggest 100-500 representative inputs
NPZ_KEYS = ("images", "inputs", "x")


def load_calibration(source: str | Path, preprocessing: Preprocessing, samples: int | None = DEFAULT_SAMPLES,
                     seed: int = 0) -> np.ndarray:
    """``samples`` model inputs (float32 NCHW, preprocessed) drawn from ``source``.

    ``samples=None`` takes everything. Raises ``InputError`` for anything that is not
    usable calibration data (missing, empty, unreadable, wrong shape or channels).
    """
    if samples is not None and samples < 1:
        raise InputError("calibration samples", "a positive number", str(samples))
    key = str(source).lower()
    path = Path(source)
    if key in BUNDLED:
        images, labels = _from_imageset(load_dataset(key, "train"))
    elif path.suffix.lower() in (".npy", ".npz") and path.is_file():
        arr, labels = _read_array(path)
        if np.issubdtype(arr.dtype, np.floating):
            x = _check_model_inputs(arr, preprocessing, path)
            return x[_pick(len(x), labels, samples, seed)]
        images = _as_nhwc_uint8(arr, path)
    elif path.is_dir():
        images, labels = _read_folder(path)
    elif path.exists():
        raise InputError(path, "a calibration source: mnist, digits, an image folder, .npy or .npz",
                         f"a {path.suffix or 'extensionless'} file")
    else:
        raise InputError(source, f"a calibration source: {', '.join(BUNDLED)}, an image folder, .npy or .npz",
                         "no such file or folder")
    idx = _pick(len(images), labels, samples, seed)
    return preprocess_images(images[idx], preprocessing, source)


def preprocess_images(images: np.ndarray, preprocessing: Preprocessing,
                      source: str | Path = "images") -> np.ndarray:
    """uint8 NHWC pixels -> the model's float32 NCHW input, honouring BGR channel order."""
    c = images.shape[-1]
    if c not in (1, 3):
        raise InputError(source, "images with 1 (grey) or 3 (RGB) channels", f"{c} channels")
    if preprocessing.channel_order == "BGR" and c == 3:
        images = images[..., ::-1]
    return to_model_input(images, tuple(preprocessing.input_size), tuple(preprocessing.mean),
                          tuple(preprocessing.std), preprocessing.channels)


def _from_imageset(ds: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    return ds.images, ds.labels


def _pick(n: int, labels: np.ndarray | None, samples: int | None, seed: int) -> np.ndarray:
    if n == 0:
        raise InputError("calibration data", "at least one sample", "none")
    if samples is None or samples >= n:
        return np.arange(n)
    if labels is not None:
        return _stratified_pick(labels, samples, seed)
    return np.sort(np.random.default_rng(seed).choice(n, samples, replace=False))


def _read_array(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(path, "a NumPy .npy/.npz file (no pickles)", f"{type(exc).__name__}: {exc}") from None
    if isinstance(data, np.ndarray):
        return data, None
    with data:
        keys = list(data.keys())
        key = next((k for k in NPZ_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise InputError(path, f"an .npz with an array named one of {', '.join(NPZ_KEYS)}",
                             f"keys {', '.join(keys) or '(none)'}")
        arr = data[key]
        labels = data["labels"] if "labels" in keys else None
    if labels is not None and (labels.ndim != 1 or len(labels) != len(arr)):
        raise InputError(path, f"labels of shape ({len(arr)},)", f"shape {tuple(labels.shape)}")
    return arr, labels


def _check_model_inputs(arr: np.ndarray, pre: Preprocessing, path: Path) -> np.ndarray:
    want = (pre.channels, *pre.input_size)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != want:
        raise InputError(path, f"preprocessed model inputs of shape (N, {', '.join(map(str, want))}) "
                               "(or uint8 raw images)", f"{arr.dtype} shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise InputError(path, "finite values", "NaN or infinity")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_nhwc_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise InputError(path, "uint8 raw images or floating-point model inputs", f"dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise InputError(path, "uint8 images (N, H, W), (N, H, W, 1) or (N, H, W, 3)",
                         f"shape {tuple(arr.shape)}")
    return arr


def _read_folder(root: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """ImageFolder layout (train split) if it has class sub-folders, else a flat folder."""
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        ds = load_dataset(root, "train")
        return ds.images, ds.labels
    files = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(root, f"image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...) or class sub-folders",
                         "no images")
    from PIL import Image, UnidentifiedImageError
    images, size, mode = [], None, None
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                mode = mode or ("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
                im = im.convert(mode)
                size = size or im.size
                if im.size != size:
                    im = im.resize(size, Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f, "a readable image", f"{type(exc).__name__}: {exc}") from None
        images.append(arr[..., None] if arr.ndim == 2 else arr)
    return np.stack(images), None


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
