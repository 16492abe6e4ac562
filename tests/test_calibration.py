"""Calibration data: real preprocessed inputs from every supported source, sampled
deterministically, bad data refused with one-line errors, and the reader protocol
driving ONNX Runtime's real static quantizer."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from exporters.artifact import Preprocessing
from models.datasets import load_dataset, to_model_input
from models.errors import InputError
from quantize.calibration import CalibrationReader, load_calibration, preprocess_images

GREY = Preprocessing([16, 16], [0.13], [0.31], "GRAY")
RGB = Preprocessing([16, 16], [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], "RGB")


def test_bundled_set_is_stratified_deterministic_and_preprocessed():
    x = load_calibration("digits", GREY, samples=20)
    assert x.shape == (20, 1, 16, 16) and x.dtype == np.float32
    np.testing.assert_array_equal(x, load_calibration("digits", GREY, samples=20))
    assert not np.array_equal(x, load_calibration("digits", GREY, samples=20, seed=1))
    # the same rows as the train split's stratified subset, preprocessed by the shared function
    sub = load_dataset("digits", "train").subset(20, seed=0)
    assert sorted(np.bincount(sub.labels, minlength=10)) == [2] * 10           # two of every class
    np.testing.assert_array_equal(x, to_model_input(sub.images, (16, 16), GREY.mean, GREY.std, 1))
    assert load_calibration("digits", RGB, samples=5).shape == (5, 3, 16, 16)   # grey -> RGB


def test_image_folders_flat_and_by_class(tmp_path):
    rng = np.random.default_rng(0)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    (flat / "notes.txt").write_text("not an image, ignored by suffix")
    x = load_calibration(flat, RGB, samples=4)
    assert x.shape == (4, 3, 16, 16)
    assert load_calibration(flat, GREY, samples=None).shape == (6, 1, 16, 16)   # RGB -> grey by luma
    by_class = tmp_path / "classes"
    for c in ("cat", "dog"):
        (by_class / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(by_class / c / f"{i}.png")
    assert load_calibration(by_class, GREY, samples=None).shape == (8, 1, 16, 16)   # the 80% train split
    bgr = load_calibration(flat, Preprocessing([16, 16], [0, 0, 0], [1, 1, 1], "BGR"), samples=None)
    rgb = load_calibration(flat, Preprocessing([16, 16], [0, 0, 0], [1, 1, 1], "RGB"), samples=None)
    np.testing.assert_array_equal(bgr, rgb[:, ::-1])


def test_numpy_files(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (10, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", raw)
    np.testing.assert_array_equal(load_calibration(tmp_path / "raw.npy", GREY, samples=None),
                                  preprocess_images(raw[..., None], GREY))
    ready = rng.standard_normal((12, 1, 16, 16)).astype(np.float32)
    np.save(tmp_path / "ready.npy", ready)
    x = load_calibration(tmp_path / "ready.npy", GREY, samples=5)
    assert x.shape == (5, 1, 16, 16) and all(any(np.array_equal(r, q) for q in ready) for r in x)
    labels = np.repeat(np.arange(3), 4)
    np.savez(tmp_path / "set.npz", images=ready, labels=labels)
    assert load_calibration(tmp_path / "set.npz", GREY, samples=3).shape == (3, 1, 16, 16)


@pytest.mark.parametrize("make, match", [
    (lambda p: np.save(p / "c.npy", np.zeros((4, 3, 16, 16), np.float32)), r"\(N, 1, 16, 16\)"),
    (lambda p: np.save(p / "c.npy", np.zeros((4, 16, 16, 4), np.uint8)), r"\(N, H, W, 3\)"),
    (lambda p: np.save(p / "c.npy", np.full((2, 1, 16, 16), np.nan, np.float32)), "finite"),
    (lambda p: np.save(p / "c.npy", np.zeros((2, 16, 16), np.int64)), "dtype int64"),
    (lambda p: np.save(p / "c.npy", np.zeros((2, 16, 16), object), allow_pickle=True), "no pickles"),
    (lambda p: np.savez(p / "c.npz", a=np.zeros(1), b=np.zeros(1)), "keys a, b"),
])
def test_bad_arrays_are_refused(tmp_path, make, match):
    make(tmp_path)
    src = next(tmp_path.iterdir())
    with pytest.raises(InputError, match=match) as info:
        load_calibration(src, GREY)
    assert "\n" not in str(info.value)


def test_bad_folders_and_sources_are_refused(tmp_path):
    with pytest.raises(InputError, match="no images"):
        load_calibration(tmp_path, GREY)                                         # empty folder
    (tmp_path / "broken.png").write_bytes(b"definitely not a PNG")
    with pytest.raises(InputError, match="readable image"):
        load_calibration(tmp_path, GREY)
    with pytest.raises(InputError, match="no such file"):
        load_calibration(tmp_path / "nope", GREY)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(InputError, match="a .csv file"):
        load_calibration(tmp_path / "x.csv", GREY)
    with pytest.raises(InputError, match="positive"):
        load_calibration("digits", GREY, samples=0)


def test_reader_protocol():
    data = np.arange(5 * 1 * 2 * 2, dtype=np.float32).reshape(5, 1, 2, 2)
    r = CalibrationReader(data, input_name="x", batch_size=2)
    batches = []
    while (b := r.get_next()) is not None:
        batches.append(b["x"])
    assert [len(b) for b in batches] == [2, 2, 1] and len(r) == 3
    np.testing.assert_array_equal(np.concatenate(batches), data)
    assert r.get_next() is None
    r.rewind()
    assert r.get_next()["x"].shape == (2, 1, 2, 2)
    nhwc = next(iter(CalibrationReader(data, layout="NHWC")))["input"]
    np.testing.assert_array_equal(nhwc, data[:1].transpose(0, 2, 3, 1))
    with pytest.raises(InputError):
        CalibrationReader(np.zeros((0, 1, 2, 2), np.float32))


def test_reader_drives_onnxruntime_static_quantization(tmp_path):
    """The duck-typed reader is what ``quantize_static`` consumes (real ORT, tiny conv)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_static

    w = np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["logits"], pads=[1, 1, 1, 1])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 16, 16])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "f.onnx")
    calib = load_calibration("digits", GREY, samples=16)
    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), CalibrationReader(calib),
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    x = calib[:1]
    f = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, {"input": x})[0]
    y = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"input": x})[0]
    assert np.abs(f - y).max() < 0.05 * np.abs(f).max()        # ranges came from the real images
