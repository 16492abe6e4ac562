"""Natural photos that ship inside installed wheels, as a calibration / evaluation set.

An ImageNet model cannot be judged on MNIST, and no data set may be downloaded here, so
the photos that scikit-image (``skimage.data``) and scikit-learn
(``load_sample_images``) carry are cut into seeded random-resized crops, the
augmentation ImageNet models are trained with: crops of 10-100% of the photo's area,
aspect 3:4 to 4:3, mirrored half of the time.

Calibration (``train``) and evaluation (``test``) crops come from **different photos**,
so a PTQ choice tuned on the calibration crops is never measured on pixels it saw.
The set has no ImageNet labels: what it measures is agreement with the float model
(top-1 / top-5) and logit SQNR. Its "labels" are the index of the source photo (for
stratified subsets), and ``ImageSet.labelled`` is False so no stage reports them as
an accuracy.
"""
from __future__ import annotations

import functools

import numpy as np

CROP_SIZE = 256                 # stored crop size; to_model_input resizes to the model's
CROPS_PER_PHOTO = {"train": 48, "test": 64}
PHOTO_SEED = 0
# colour photos first; grey ones (replicated to RGB) add textures and scenes
CALIBRATION_PHOTOS = ("astronaut", "coffee", "sklearn:china", "immunohistochemistry", "camera", "brick", "grass")
EVALUATION_PHOTOS = ("chelsea", "rocket", "sklearn:flower", "coins", "moon", "clock", "gravel")


def _photo(name: str) -> np.ndarray:
    """One photo as uint8 HxWx3."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_images
        data = load_sample_images()
        idx = [f.rsplit("/", 1)[-1].split(".")[0] for f in data.filenames].index(name.split(":", 1)[1])
        img = data.images[idx]
    else:
        import skimage.data
        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _random_resized_crops(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image
    h, w = img.shape[:2]
    pil = Image.fromarray(img)
    out = np.empty((n, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for k in range(n):
        for _ in range(20):
            area = h * w * rng.uniform(0.10, 1.0)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:                                   # a central square
            cw = ch = min(h, w)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = pil.crop((x0, y0, x0 + cw, y0 + ch)).resize((CROP_SIZE, CROP_SIZE), Image.BILINEAR)
        arr = np.asarray(crop)
        out[k] = arr[:, ::-1] if rng.random() < 0.5 else arr
    return out


@functools.lru_cache(maxsize=None)
def photo_crops(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``(crops uint8 NHWC, source-photo index, photo names)`` of ``train`` or ``test``."""
    names = CALIBRATION_PHOTOS if split == "train" else EVALUATION_PHOTOS
    rng = np.random.default_rng(PHOTO_SEED + (0 if split == "train" else 1))
    n = CROPS_PER_PHOTO["train" if split == "train" else "test"]
    crops = [_random_resized_crops(_photo(p), n, rng) for p in names]
    images = np.concatenate(crops)
    labels = np.repeat(np.arange(len(names), dtype=np.int64), n)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels, names


__all__ = ["CALIBRATION_PHOTOS", "EVALUATION_PHOTOS", "photo_crops"]
