"""Images in, model inputs out: the one reader and the one preprocessing for every stage.

Training, calibration, verification and evaluation all read their inputs here, so a
folder is never preprocessed one way for calibration and another for parity:

* ``read_image``: one image file -> ``uint8 (H, W, C)`` (C = 1 or 3), Pillow's
  decompression-bomb limit enforced as an error (``Image.MAX_IMAGE_PIXELS``);
  ``check_image_headers``/``check_image_source``: the same limit from the headers alone,
  for every file before any is decoded.
* ``read_images``: image files -> one ``uint8 (N, H, W, C)`` batch; every image takes
  the colour mode of the first (grey or RGB) and images of another size are resized
  to ``size`` (default: the first image's) by ``resize_pixels``.
* ``read_array``: a ``.npy``/``.npz`` (never unpickled) -> array and labels if any;
  an ``.npz`` holds the array under the first of ``NPZ_INPUT_KEYS`` it has (or its
  only array) and labels under the first of ``NPZ_LABEL_KEYS``.
* ``preprocess``: uint8 pixels -> the model's float32 NCHW input as its
  ``Preprocessing`` says (channel order, size, resize filter, pixel scale, mean/std).
* ``load_images``: any source (a bundled set's name, an ImageFolder-layout folder,
  a flat folder of images, a single image, ``.npy``/``.npz``) -> ``ModelInputs``,
  sampled and preprocessed.

Resize policy: ``Preprocessing.resize`` names the filter (``RESIZE_FILTERS``) and
``Preprocessing.crop_pct`` the geometry: None resizes straight to the model's size; a
fraction is timm's eval transform (resize to size / crop_pct, the shorter side when that
is square, then centre-crop the size). Both are applied by ``_fit`` alone, through
``preprocess`` (arrays, bundled sets) or ``read_images`` (files, once per image, whatever
its size): PyTorch's ``interpolate`` with antialiasing when shrinking, the same function
training uses.

Where the values come from (the command line, the checkpoint, a timm-style
``pretrained_cfg``/``default_cfg``) is the export stage's business; this module gives
the parsers it uses (``parse_size``, ``canonical_mean_std``: 0-255 or 0-1 scale in, the
0-1 scale stored; ``from_model_config``).

Importing this module needs numpy only (torch and Pillow are imported when used), so
the ``Preprocessing`` record travels in the device runner bundle.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from models.errors import InputError
from models.util import error_line

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
RESIZE_FILTERS = ("bilinear", "bicubic", "nearest")
NPZ_INPUT_KEYS = ("images", "inputs", "x")
NPZ_LABEL_KEYS = ("labels", "y")
GREY_MODES = ("L", "1", "I;16", "I", "LA")


@dataclass
class Preprocessing:
    """How a raw image becomes the model input: ``(pixel * pixel_scale - mean) / std``,
    resized to ``input_size`` with the ``resize`` filter, in ``channel_order``."""

    input_size: list[int]                 # [H, W]
    mean: list[float]
    std: list[float]
    channel_order: str = "RGB"            # RGB | BGR | GRAY
    layout: str = "NCHW"
    pixel_scale: float = 1 / 255          # raw pixel -> [0, 1]
    resize: str = "bilinear"              # one of RESIZE_FILTERS
    # timm's crop_pct: resize to input_size / crop_pct (shorter side, aspect kept), then
    # centre-crop input_size. None: resize straight to input_size (aspect not kept).
    crop_pct: float | None = None

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "GRAY" else 3

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """From a manifest's ``preprocessing`` (older manifests lack the newer fields)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def resize_note(self) -> str:
        """What the app must do to a camera frame before the model (the app metadata's words)."""
        h, w = self.input_size
        if self.crop_pct:
            import math
            th, tw = math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)
            first = (f"resize ({self.resize}) the shorter side to {th} (aspect kept)" if th == tw
                     else f"resize ({self.resize}) to {th}x{tw}")
            return f"{first}, then centre-crop {h}x{w}"
        return f"resize ({self.resize}) to {h}x{w}"

    def describe(self) -> str:
        """One line for humans: size, order, mean/std (0-1 scale), resize policy."""
        h, w = self.input_size
        crop = f", resize {self.resize} to {h}/{self.crop_pct:g} then centre crop" if self.crop_pct else \
            f", resize {self.resize}"
        return (f"{self.channel_order} {h}x{w}, mean {_fmt_list(self.mean)}, std {_fmt_list(self.std)} "
                f"(on 0-1 pixels){crop}")


def _fmt_list(values: Sequence[float]) -> str:
    return "(" + ",".join(f"{v:.4g}" for v in values) + ")"


# -- values given by people or model configs -> the canonical record -----------

def parse_size(value: "int | str | Sequence[int | str]", what: str = "--input-size") -> list[int]:
    """``224``, ``"48x64"``, ``"48 64"``, ``[48, 64]`` or timm's ``(3, 48, 64)`` -> ``[H, W]``."""
    if isinstance(value, (int, np.integer)):
        parts: list = [value, value]
    elif isinstance(value, str):
        import re
        match = re.fullmatch(r"\s*(\d+)\s*(?:[x,\s]\s*(\d+)\s*)?", value.lower())
        parts = [match.group(1), match.group(2) or match.group(1)] if match else []
    else:
        parts = [p for v in value for p in (parse_size(v, what) if isinstance(v, str) and "x" in v.lower()
                                              else [v])]
        parts = parts * 2 if len(parts) == 1 else parts[-2:] if len(parts) == 3 else parts
    try:
        hw = [int(p) for p in parts]
    except (TypeError, ValueError):
        hw = []
    if len(hw) != 2 or min(hw) < 1:
        raise InputError(what, "a size N, HxW or H W of positive integers", repr(value))
    return hw


def canonical_mean_std(mean: Sequence[float], std: Sequence[float], what: str = "--mean/--std"
                       ) -> tuple[list[float], list[float]]:
    """Mean/std on either pixel scale -> the 0-1 scale the record keeps.

    A value above 1 anywhere in ``mean`` or ``std`` means both were given on the 0-255
    scale (``127.5``/``127.5``), and both are divided by 255; otherwise they are on the
    0-1 scale already (``0.485``, ``0.5``). One value is used for every channel."""
    m, s = [float(v) for v in mean], [float(v) for v in std]
    if not m or not s or not all(np.isfinite(m + s)):
        raise InputError(what, "finite numbers", f"mean {m}, std {s}")
    if any(v <= 0 for v in s):
        raise InputError(what, "a positive std", f"std {s}")
    if max(abs(v) for v in m + s) > 1.0:
        m, s = [v / 255.0 for v in m], [v / 255.0 for v in s]
    return m, s


def from_model_config(cfg: dict | None) -> dict:
    """A timm-style ``pretrained_cfg``/``default_cfg`` (``mean``, ``std``, ``input_size``
    ``(C, H, W)``, ``interpolation``, ``crop_pct``) -> ``Preprocessing`` fields it sets."""
    out: dict = {}
    if not isinstance(cfg, dict):
        return out
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        mean = list(np.atleast_1d(cfg["mean"])) if not isinstance(cfg["mean"], (list, tuple)) else cfg["mean"]
        std = list(np.atleast_1d(cfg["std"])) if not isinstance(cfg["std"], (list, tuple)) else cfg["std"]
        out["mean"], out["std"] = canonical_mean_std(mean, std, "model config mean/std")
    if cfg.get("input_size") is not None:
        out["input_size"] = parse_size(cfg["input_size"], "model config input_size")
    if cfg.get("interpolation") in RESIZE_FILTERS:
        out["resize"] = cfg["interpolation"]
    if cfg.get("crop_pct") is not None:
        out["crop_pct"] = check_crop_pct(cfg["crop_pct"], "model config crop_pct")
    if cfg.get("channel_order") in ("RGB", "BGR"):
        out["channel_order"] = cfg["channel_order"]
    return out


def check_crop_pct(value: float | None, what: str = "--crop-pct") -> float | None:
    """None (resize straight to the size) or a fraction in (0, 1]."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (0.0 < v <= 1.0):
        raise InputError(what, "a fraction in (0, 1], e.g. 0.875", repr(value))
    return v


@dataclass
class ModelInputs:
    """Preprocessed inputs of a source: ``x`` float32 NCHW, labels (indices into
    ``classes`` for a folder) when the source has them."""

    x: np.ndarray
    labels: np.ndarray | None
    classes: list[str] | None
    source: str


# -- the one resize and the one preprocessing ----------------------------------

def _check_filter(resize: str) -> str:
    if resize not in RESIZE_FILTERS:
        raise InputError("preprocessing resize", f"one of {', '.join(RESIZE_FILTERS)}", repr(resize))
    return resize


def _resize(x: "torch.Tensor", size: tuple[int, int], resize: str) -> "torch.Tensor":
    """Float NCHW -> ``size`` with the named filter (antialiased for bilinear/bicubic)."""
    import torch.nn.functional as F
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if _check_filter(resize) == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=resize, align_corners=False, antialias=True)


def _fit(x: "torch.Tensor", size: tuple[int, int], resize: str, crop_pct: float | None) -> "torch.Tensor":
    """Float NCHW -> ``size`` (H, W): the resize/crop policy, the one place it is applied.

    ``crop_pct`` None: resize straight to ``size``. Otherwise timm's eval transform:
    the target ``floor(size / crop_pct)``; when it is square the shorter side is resized
    to it (aspect kept), else the image is resized to it exactly; then the centre
    ``size`` is cropped (torchvision's rounding of the offsets)."""
    if crop_pct is None:
        return _resize(x, size, resize)
    import math
    h, w = int(x.shape[-2]), int(x.shape[-1])
    th, tw = (math.floor(size[0] / crop_pct), math.floor(size[1] / crop_pct))
    if th == tw:
        short, long_ = (h, w) if h <= w else (w, h)
        new_long = int(th * long_ / short)
        nh, nw = (th, new_long) if h <= w else (new_long, th)
    else:
        nh, nw = th, tw
    nh, nw = max(nh, size[0]), max(nw, size[1])
    x = _resize(x, (nh, nw), resize)
    top, left = int(round((nh - size[0]) / 2.0)), int(round((nw - size[1]) / 2.0))
    return x[..., top:top + size[0], left:left + size[1]]


def resize_pixels(images: np.ndarray, size: tuple[int, int], resize: str = "bilinear",
                  crop_pct: float | None = None) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC of ``size`` (H, W), by the same policy as ``preprocess``."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    y = _fit(x, tuple(size), resize, crop_pct).round().clamp(0, 255)
    return y.permute(0, 2, 3, 1).contiguous().to(torch.uint8).numpy()


def normalise(images: np.ndarray, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
              channels: int | None = None, resize: str = "bilinear", pixel_scale: float = 1 / 255,
              crop_pct: float | None = None) -> np.ndarray:
    """uint8 NHWC pixels -> float32 NCHW: ``* pixel_scale``, grey <-> RGB, resize, ``(x-mean)/std``.

    ``channels`` converts grey <-> RGB when the model wants the other (grey is replicated;
    RGB is reduced with the ITU-R 601 luma weights, as PIL's ``convert("L")``).
    """
    import torch
    if images.ndim != 4:
        raise InputError("images", "a 4-D uint8 batch (N, H, W, C)", f"shape {tuple(images.shape)}")
    # divided by 1/pixel_scale (255 exactly for the default): bit-identical to pixels / 255
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / (1.0 / float(pixel_scale))
    c = x.shape[1]
    channels = channels or len(mean)
    if c != channels:
        if c == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif c == 3 and channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x * w).sum(1, keepdim=True)
        else:
            raise InputError("images", f"{channels} channels", f"{c} channels")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = _fit(x, hw, resize, crop_pct)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - m) / s).numpy().astype(np.float32)


def preprocess(images: np.ndarray, pre: Preprocessing, source: str | Path = "images",
               fitted: bool = False) -> np.ndarray:
    """uint8 NHWC pixels -> the model's float32 NCHW input, as ``pre`` says (BGR honoured).

    ``fitted``: the pixels went through ``read_images(..., pre=pre)`` and are at the
    model's size already (resize/crop applied per image); only normalisation is left."""
    c = images.shape[-1]
    if images.ndim != 4 or c not in (1, 3):
        raise InputError(source, "images (N, H, W, C) with 1 (grey) or 3 (RGB) channels",
                         f"shape {tuple(images.shape)}")
    if pre.channel_order == "BGR" and c == 3:
        images = images[..., ::-1]
    return normalise(images, tuple(pre.input_size), tuple(pre.mean), tuple(pre.std), pre.channels,
                     pre.resize, pre.pixel_scale, None if fitted else pre.crop_pct)


# -- reading --------------------------------------------------------------------

def read_image(path: str | Path, mode: str | None = None) -> np.ndarray:
    """One image file -> uint8 ``(H, W, C)``: grey (C=1) or RGB (C=3), or ``mode`` if given.

    Refuses what Pillow cannot read and images beyond Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``), both as ``InputError``.
    """
    from PIL import Image
    path = Path(path)
    with _pillow_errors(path), Image.open(path) as im:
        im.load()
        mode = mode or ("L" if im.mode in GREY_MODES else "RGB")
        arr = np.array(im.convert(mode), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def check_image_headers(files: Sequence[str | Path]) -> None:
    """Open every file's header and decode nothing: ``Image.open`` reads the size only, and
    Pillow checks its decompression-bomb limit there. So a bomb (or a file Pillow cannot
    identify) deep in a folder is refused, as ``read_image`` would refuse it, before the
    images ahead of it are decoded or any other work starts."""
    from PIL import Image
    for f in files:
        with _pillow_errors(Path(f)), Image.open(f):
            pass


def check_image_source(source: str | Path | None) -> None:
    """``check_image_headers`` of every image file under ``source`` (a folder, in any layout
    ``load_images`` reads: every non-hidden sub-folder is searched) or of ``source`` itself
    (an image file); anything else (a bundled set's name, an array file, a path that does
    not exist) is left to the loader. For inputs read late, such as ``export``'s
    calibration images: checked before any work instead of after minutes of it."""
    if source is None:
        return
    path = Path(source)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        check_image_headers([path])
    elif path.is_dir():
        files = []
        for folder, subs, names in os.walk(path):
            subs[:] = sorted(d for d in subs if not d.startswith("."))
            files += [Path(folder) / n for n in sorted(names) if Path(n).suffix.lower() in IMAGE_SUFFIXES]
        check_image_headers(files)


@contextlib.contextmanager
def _pillow_errors(path: Path) -> Iterator[None]:
    """Pillow's refusals of ``path`` as one-line ``InputError``s: the decompression-bomb
    warning (above ``MAX_IMAGE_PIXELS``) and error (above twice that), unreadable files."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(path, f"an image of at most {Image.MAX_IMAGE_PIXELS} pixels (Pillow's "
                               "decompression-bomb limit)", _bomb_size(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(path, "a readable image", error_line(exc)) from None


def _bomb_size(exc: Exception) -> str:
    text = str(exc)
    return text.split(" exceeds")[0].strip() if " exceeds" in text else type(exc).__name__


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder (by suffix), in sorted order."""
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def read_images(files: Sequence[Path], size: Sequence[int] | None = None, resize: str = "bilinear",
                crop_pct: float | None = None) -> np.ndarray:
    """Image files -> uint8 ``(N, H, W, C)``: every image in the first one's mode (grey or
    RGB); an image whose (H, W) differs from ``size`` (default: the first image's) is
    resized to it by ``resize_pixels``; with ``crop_pct`` every image is brought to
    ``size`` by the resize-then-centre-crop policy (images of any aspect)."""
    check_image_headers(files)          # a bomb at the end: refused before decoding the rest
    images: list[np.ndarray] = []
    mode: str | None = None
    hw = tuple(size) if size is not None else None
    for f in files:
        arr = read_image(f, mode)
        mode = mode or ("L" if arr.shape[-1] == 1 else "RGB")
        hw = hw or arr.shape[:2]
        if arr.shape[:2] != hw or crop_pct is not None:
            arr = resize_pixels(arr[None], hw, resize, crop_pct)[0]
        images.append(arr)
    if not images:
        raise InputError("images", "at least one image file", "none")
    return np.stack(images)


def read_array(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A ``.npy``/``.npz`` (``allow_pickle=False``) -> (array, int64 labels or None)."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError (pickled object arrays), OSError, zipfile errors
        raise InputError(path, "a NumPy .npy/.npz file (no pickles)", error_line(exc, 160)) from None
    if isinstance(data, np.ndarray):
        return data, None
    with data:
        keys = list(data.keys())
        key = next((k for k in NPZ_INPUT_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise InputError(path, f"an .npz with an array named one of {', '.join(NPZ_INPUT_KEYS)}",
                             f"keys {', '.join(keys) or '(none)'}")
        try:
            arr = data[key]
            lkey = next((k for k in NPZ_LABEL_KEYS if k in keys and k != key), None)
            labels = np.asarray(data[lkey]) if lkey else None
        except ValueError as exc:                     # an object array inside the .npz
            raise InputError(path, "a NumPy .npy/.npz file (no pickles)", error_line(exc, 160)) from None
    if labels is not None:
        if labels.size == len(arr):
            labels = labels.reshape(-1)                   # (N, 1) as well as (N,)
        if labels.ndim != 1 or len(labels) != len(arr):
            raise InputError(path, f"labels of shape ({len(arr)},), one per input", f"shape {tuple(labels.shape)}")
        labels = labels.astype(np.int64)
    return arr, labels


def check_model_inputs(arr: np.ndarray, pre: Preprocessing, source: str | Path) -> np.ndarray:
    """Floating-point arrays are model inputs already preprocessed: ``(N, C, H, W)`` exactly."""
    want = (pre.channels, *pre.input_size)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != want:
        raise InputError(source, f"preprocessed model inputs of shape (N, {', '.join(map(str, want))}) "
                                 "(or uint8 raw images)", f"{arr.dtype} shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise InputError(source, "finite values", "NaN or infinity")
    return np.ascontiguousarray(arr, dtype=np.float32)


def as_pixels(arr: np.ndarray, source: str | Path) -> np.ndarray:
    """uint8 ``(N, H, W)`` or ``(N, H, W, 1|3)`` -> uint8 NHWC."""
    if arr.dtype != np.uint8:
        raise InputError(source, "uint8 raw images or floating-point model inputs", f"dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise InputError(source, "uint8 images (N, H, W), (N, H, W, 1) or (N, H, W, 3)",
                         f"shape {tuple(arr.shape)}")
    return arr


# -- any source -> model inputs --------------------------------------------------

def sample_indices(n: int, labels: np.ndarray | None, samples: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``samples`` of ``n`` items: class-stratified when labels are known
    (every class represented), a seeded choice otherwise; all when ``samples`` is None."""
    if n == 0:
        raise InputError("inputs", "at least one sample", "none")
    if samples is None or samples >= n:
        return np.arange(n)
    if labels is not None:
        from models.datasets import _stratified_pick
        return _stratified_pick(labels, samples, seed)
    return np.sort(np.random.default_rng(seed).choice(n, samples, replace=False))


def _few(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def match_class_folders(classes: Sequence[str], model_labels: Sequence[str] | None,
                        num_classes: int | None = None) -> tuple[np.ndarray | None, str | None]:
    """Folder index -> the model's class index, and a one-line note when there is no match.

    Class folders are matched to the model's labels **by name**: folder ``cat/`` is the
    class labelled ``"cat"``, wherever it sorts. Numbered folders (torchvision's
    ``0/ ... 9/``) whose names are no label are class indices (``10/`` is class 10, not the
    third folder in sorted order), and the note says so. Without labels, numbered folders
    are class indices and named ones take the sorted order (ImageFolder's convention).
    Otherwise the mapping is None (no ground truth: accuracy is not measured) and the
    note names the unmatched folders and the labels no folder matched, so accuracy is
    never silently missing.
    """
    classes = [str(c) for c in classes]
    numbered = all(c.isdigit() for c in classes)
    if model_labels is None:
        if numbered:
            idx = [int(c) for c in classes]
            if num_classes is not None and max(idx) >= num_classes:
                big = [c for c in classes if int(c) >= num_classes]
                return None, (f"class folders {_few(big)} are numbers beyond the model's {num_classes} "
                              "classes: accuracy not measured")
            return np.asarray(idx, np.int64), None
        return np.arange(len(classes), dtype=np.int64), None
    labels = [str(x) for x in model_labels]
    index = {name: i for i, name in enumerate(labels)}
    if all(c in index for c in classes):
        return np.asarray([index[c] for c in classes], np.int64), None
    if numbered and not any(c in index for c in classes) and max(int(c) for c in classes) < len(labels):
        idx = [int(c) for c in classes]
        return np.asarray(idx, np.int64), (
            f"class folders are numbers, not label names: taken as class indices "
            f"({', '.join(f'{c}/ = {labels[int(c)]!r}' for c in classes[:3])}{', ...' if len(classes) > 3 else ''})")
    import difflib
    unmatched = [c for c in classes if c not in index]
    found = set(classes)
    unused = [name for name in labels if name not in found]
    near = {c: difflib.get_close_matches(c, unused, n=1, cutoff=0.6) for c in unmatched}
    guesses = [f"{c!r} -> {m[0]!r}?" for c, m in near.items() if m]
    # the likely counterparts first, so a typo's label is named even among 1,000 classes
    unused = [m[0] for m in near.values() if m] + [u for u in unused if not any(u in m for m in near.values())]
    return None, (f"accuracy not measured: class folder(s) {_few(unmatched)} match no label of the model "
                  f"(folders are matched to labels by name)"
                  + (f" ({', '.join(guesses[:3])})" if guesses else "")
                  + f"; labels with no folder: {_few(list(dict.fromkeys(unused))) or 'none'}")


def _has_class_folders(root: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())


def load_images(source: str | Path, pre: Preprocessing, split: str = "all", samples: int | None = None,
                seed: int = 0) -> ModelInputs:
    """``samples`` preprocessed model inputs from ``source`` (all when None).

    ``source``: ``mnist``/``digits`` (its ``split``), a folder in ImageFolder layout (its
    ``split``: a ``train/``/``test/``/``val/`` sub-folder or the seeded 80/20 split;
    ``all`` is every image), a flat folder of images, one image file, or a ``.npy``/
    ``.npz`` of uint8 images ``(N, H, W[, C])`` or float model inputs ``(N, C, H, W)``.
    """
    from models.datasets import BUNDLED, is_bundled, load_dataset
    if samples is not None and samples < 1:
        raise InputError("samples", "a positive number", str(samples))
    _check_filter(pre.resize)
    key = str(source).lower()
    path = Path(source)
    classes: list[str] | None = None
    labels: np.ndarray | None = None
    label = str(source)
    groups: np.ndarray | None = None          # stratifies sampling; never reported as labels
    fitted = False                            # files are read at the model's size (resize/crop applied)
    if is_bundled(source):
        ds = load_dataset(key, split)
        pixels, labels, classes, label = ds.images, ds.labels, ds.classes, f"{key} ({split} split)"
        if not ds.labelled:                   # photos: labels only say which photo a crop came from
            groups, labels, classes = labels, None, None
    elif path.suffix.lower() in (".npy", ".npz") and path.is_file():
        arr, labels = read_array(path)
        if np.issubdtype(arr.dtype, np.floating):
            x = check_model_inputs(arr, pre, path)
            idx = sample_indices(len(x), labels, samples, seed)
            return ModelInputs(x[idx], None if labels is None else labels[idx], None, label)
        pixels = as_pixels(arr, path)
    elif path.is_dir():
        if _has_class_folders(path):
            ds = load_dataset(path, split, size=tuple(pre.input_size), resize=pre.resize, crop_pct=pre.crop_pct)
            fitted = True
            pixels, labels, classes, label = ds.images, ds.labels, ds.classes, f"{path} ({split})"
        else:
            files = image_files(path)
            if not files:
                raise InputError(path, f"image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...) or class "
                                       "sub-folders", "no images")
            pixels = read_images(files, tuple(pre.input_size), pre.resize, pre.crop_pct)
            fitted = True
    elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        pixels = read_images([path], tuple(pre.input_size), pre.resize, pre.crop_pct)
        fitted = True
    elif path.exists():
        raise InputError(path, f"inputs: {', '.join(BUNDLED)}, an image folder, an image, .npy or .npz",
                         f"a {path.suffix or 'extensionless'} file")
    else:
        raise InputError(source, f"inputs: {', '.join(BUNDLED)}, an image folder, an image, .npy or .npz",
                         "no such file or folder")
    idx = sample_indices(len(pixels), labels if groups is None else groups, samples, seed)
    return ModelInputs(preprocess(pixels[idx], pre, path, fitted), None if labels is None else labels[idx],
                       classes, label)
