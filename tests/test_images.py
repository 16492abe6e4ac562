"""One image reader and one preprocessing for every stage (``models.images``): calibration
and verify turn the same folder, image or array file into identical model inputs; unsafe
files are refused with one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from exporters.artifact import Manifest
from models.errors import InputError
from models.images import Preprocessing, load_images, preprocess, read_image, resize_pixels
from pipeline.stages.verify import load_inputs
from quantize.calibration import load_calibration
from tests.test_bad_inputs import _png_header_only  # the same header-only bomb PNG

RGB = Preprocessing([16, 16], [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], "RGB")
BGR = Preprocessing([16, 16], [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], "BGR")
GREY = Preprocessing([12, 12], [0.13], [0.31], "GRAY")


def _verify(source, pre: Preprocessing, labels: list[str] | None = None):
    return load_inputs(str(source), Manifest(model="m", preprocessing=pre, labels=labels), None)


def _photo_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth gradients plus noise: resize filters give visibly different results on it."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def mixed_folder(tmp_path):
    """A flat folder of real files: PNG and JPEG, three sizes (one the model's), and a grey
    image among RGB ones; plus a file that is not an image (ignored by its suffix)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "flat"
    root.mkdir()
    Image.fromarray(_photo_like(rng, 20, 24)).save(root / "a.png")
    Image.fromarray(_photo_like(rng, 16, 16)).save(root / "b.png")
    Image.fromarray(_photo_like(rng, 31, 17)).save(root / "c.jpg", quality=90)
    Image.fromarray(_photo_like(rng, 20, 24)[..., 0]).save(root / "d.png")        # grey
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("pre", [RGB, BGR, GREY], ids=["rgb", "bgr", "grey"])
def test_calibration_and_verify_preprocess_a_folder_identically(mixed_folder, pre):
    calib = load_calibration(mixed_folder, pre, samples=None)
    parity = _verify(mixed_folder, pre).x
    assert calib.shape == (4, pre.channels, *pre.input_size) and calib.dtype == np.float32
    np.testing.assert_array_equal(calib, parity)
    # the one resize policy: an odd-sized image goes straight to the model's size by the
    # named filter (antialiased bilinear), not to the first image's size first
    c = read_image(mixed_folder / "c.jpg", "RGB")
    expect = preprocess(resize_pixels(c[None], tuple(pre.input_size), pre.resize), pre)
    np.testing.assert_array_equal(calib[2:3], expect)


def test_bgr_models_get_bgr_inputs_in_verify_too(mixed_folder):
    """Verify used to ignore the channel order (calibration honoured it)."""
    bgr, rgb = _verify(mixed_folder, BGR).x, _verify(mixed_folder, RGB).x
    mean, std = np.array(RGB.mean)[:, None, None], np.array(RGB.std)[:, None, None]
    np.testing.assert_allclose(bgr * std + mean, (rgb * std + mean)[:, ::-1], atol=1e-6)   # pixels, BGR


def test_calibration_and_verify_read_an_npz_identically(tmp_path):
    """The same key order for both: ``images`` wins over ``inputs``; ``y`` holds labels."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8)
    ready = rng.standard_normal((6, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "set.npz", inputs=ready, images=images, y=np.arange(6) % 2)
    calib = load_calibration(tmp_path / "set.npz", RGB, samples=None)
    parity = _verify(tmp_path / "set.npz", RGB)
    np.testing.assert_array_equal(calib, parity.x)
    np.testing.assert_array_equal(calib, preprocess(images, RGB))
    assert parity.labels.tolist() == [0, 1, 0, 1, 0, 1]
    np.savez(tmp_path / "ready.npz", inputs=ready)
    np.testing.assert_array_equal(load_calibration(tmp_path / "ready.npz", RGB, samples=None), ready)
    np.testing.assert_array_equal(_verify(tmp_path / "ready.npz", RGB).x, ready)


def test_class_folders_same_preprocessing_calibration_takes_the_train_split(tmp_path):
    rng = np.random.default_rng(2)
    for cls in ("3", "7"):
        (tmp_path / "c" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(_photo_like(rng, 18 + i, 22)).save(tmp_path / "c" / cls / f"{i}.png")
    calib = load_calibration(tmp_path / "c", RGB, samples=None)
    parity = _verify(tmp_path / "c", RGB, labels=[str(i) for i in range(10)])
    assert len(calib) == 8 and len(parity.x) == 10                   # 80% train split vs all
    assert all(any(np.array_equal(row, p) for p in parity.x) for row in calib)
    assert parity.labels.tolist() == [3] * 5 + [7] * 5


def test_a_single_image_file_is_a_source(mixed_folder):
    one = load_calibration(mixed_folder / "a.png", RGB, samples=None)
    np.testing.assert_array_equal(one, _verify(mixed_folder / "a.png", RGB).x)
    np.testing.assert_array_equal(one, load_calibration(mixed_folder, RGB, samples=None)[:1])


@pytest.mark.parametrize("pixels", [150, 400], ids=["warning-limit", "error-limit"])
def test_decompression_bombs_are_one_line_input_errors(tmp_path, monkeypatch, pixels):
    """Pillow warns above MAX_IMAGE_PIXELS and raises above twice that: both refuse here."""
    Image.fromarray(np.zeros((pixels // 10, 10, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for load in (lambda: load_calibration(tmp_path, RGB), lambda: _verify(tmp_path, RGB),
                 lambda: read_image(tmp_path / "big.png")):
        with pytest.raises(InputError, match="decompression-bomb") as info:
            load()
        assert "\n" not in str(info.value) and "big.png" in str(info.value)


def test_pickled_arrays_and_unknown_filters_are_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for load in (lambda: load_calibration(tmp_path / "obj.npy", RGB), lambda: _verify(tmp_path / "obj.npy", RGB)):
        with pytest.raises(InputError, match="no pickles"):
            load()
    np.savez(tmp_path / "obj.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="no pickles"):
        load_calibration(tmp_path / "obj.npz", RGB)
    with pytest.raises(InputError, match="bilinear, bicubic, nearest"):
        load_images(tmp_path / "obj.npz", Preprocessing([16, 16], [0.5], [0.5], "GRAY", resize="lanczos"))


def test_a_folder_named_like_a_bundled_set_is_the_users(tmp_path, monkeypatch):
    """``--inputs photos`` in a directory holding a ``photos/`` folder means that folder,
    not the bundled photo crops (a name users pick for their own images)."""
    from PIL import Image

    from models.datasets import is_bundled
    from models.images import Preprocessing, load_images
    for cls in ("cat", "dog"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (40 * i, 80, 120)).save(tmp_path / "photos" / cls / f"{i}.png")
    pre = Preprocessing([16, 16], [0.5] * 3, [0.5] * 3, "RGB")
    assert is_bundled("photos")                               # nothing named so here (the test's cwd)
    monkeypatch.chdir(tmp_path)
    assert not is_bundled("photos")
    got = load_images("photos", pre, "all", None)
    assert got.x.shape == (6, 3, 16, 16) and got.classes == ["cat", "dog"]


def _folder_with_a_bomb_last(root):
    """Two class folders: good images, one truncated PNG (its header is fine, its pixels are
    not: reading it fails only when it is decoded), and last, a 14000x14000 bomb."""
    import io
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(root / "a" / f"{i}.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(buf, "PNG")
    (root / "b" / "0-truncated.png").write_bytes(buf.getvalue()[:200])
    return _png_header_only(root / "b" / "9-bomb.png", 14000, 14000)


def test_every_header_is_checked_before_any_image_is_decoded(tmp_path):
    """A bomb at the end of a folder is found by the header scan before any image is
    decoded: the error names the bomb, not the truncated file decoding would reach first
    (training, calibration and verify read folders through ``read_images``)."""
    from models.datasets import load_dataset
    from models.images import check_image_source, read_images
    root = tmp_path / "data"
    bomb = _folder_with_a_bomb_last(root)
    files = sorted(root.rglob("*.png"))
    for load in (lambda: read_images(files), lambda: load_dataset(root, "train"),
                 lambda: load_calibration(root / "b", GREY), lambda: check_image_source(root)):
        with pytest.raises(InputError, match="decompression-bomb") as info:
            load()
        assert "\n" not in str(info.value) and str(bomb) in str(info.value)
    with pytest.raises(InputError, match="readable image"):        # decoding alone finds this one
        read_images(files[:-1])


def test_export_refuses_a_bomb_in_its_calibration_folder_before_any_work(cli, tmp_path):
    """``export --calibration FOLDER`` reads the images only when a quantized precision
    needs them, after the model is built and the float formats are converted; a bomb deep in
    the folder is refused before any of that: exit 2, the one line on stderr (no progress
    before it) names the file, nothing is written."""
    from tests.parity_helpers import mnist_checkpoint
    ckpt = mnist_checkpoint(tmp_path / "ckpt" / "model.safetensors")
    bomb = _folder_with_a_bomb_last(tmp_path / "calib")
    out = tmp_path / "exports" / "app"
    code, _, err = cli("export", "--checkpoint", str(ckpt), "--formats", "tflite", "--precisions", "int8",
                       "--calibration", str(tmp_path / "calib"), "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(bomb) in err and "decompression-bomb" in err, err
    assert not (tmp_path / "exports").exists()
