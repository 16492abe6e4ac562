"""TFLite app metadata: written with the metadata schema, read back field by field, and
the model still loads and runs in LiteRT. The model here comes straight from
TensorFlow's converter (no onnx2tf) to keep the file fast."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from exporters.artifact import ModelCard, Preprocessing
from exporters.tflite_metadata import (LABELS_FILE, MIN_PARSER_VERSION, associated_files, build_metadata_buffer,
                                       image_classifier_metadata, metadata_buffer, parse_metadata_buffer,
                                       populate, read_metadata, strip_associated_files)

CARD = ModelCard(name="digit-classifier", description="Classifies handwritten digits.",
                 version="1.2.0", author="mdeploy", license="Apache-2.0")
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def plain_model() -> bytes:
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    rng = np.random.default_rng(0)
    w = tf.constant(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
    d = tf.constant(rng.standard_normal((4, 10)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32, name="input")])
    def f(x):
        y = tf.nn.relu(tf.nn.conv2d(x, w, 1, "SAME"))
        return tf.matmul(tf.reduce_mean(y, axis=[1, 2]), d)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    return bytes(conv.convert())


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_content=model)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def test_every_field_reads_back(plain_model):
    pre = Preprocessing([16, 16], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], channel_order="RGB")
    written = image_classifier_metadata(CARD, pre, input_name="input", output_name="logits", labels=LABELS)
    model = populate(plain_model, written)
    got = read_metadata(model)
    assert got == written          # dataclass equality: every field, files included
    # and the values are what an Android app needs, in its units (raw 0..255 pixels)
    assert (got.name, got.description, got.version, got.author, got.license) == \
        (CARD.name, CARD.description, CARD.version, CARD.author, CARD.license)
    assert got.min_parser_version == MIN_PARSER_VERSION
    image, out = got.inputs[0], got.outputs[0]
    assert image.content == "image" and image.color_space == "RGB" and image.image_size == (16, 16)
    np.testing.assert_allclose(image.mean, np.float32(np.array(pre.mean) * 255), rtol=1e-7)
    np.testing.assert_allclose(image.std, np.float32(np.array(pre.std) * 255), rtol=1e-7)
    np.testing.assert_allclose(image.stats_min, [(0 - m * 255) / (s * 255) for m, s in zip(pre.mean, pre.std)], rtol=1e-6)
    assert out.content == "feature" and out.files[0].type == "TENSOR_AXIS_LABELS"
    assert got.labels == LABELS


def test_model_is_a_zip_and_still_runs(plain_model):
    pre = Preprocessing([16, 16], [0.5] * 3, [0.25] * 3)
    model = populate(plain_model, image_classifier_metadata(CARD, pre, input_name="input", output_name="logits",
                                                            labels=LABELS))
    with zipfile.ZipFile(io.BytesIO(model)) as zf:
        assert zf.namelist() == [LABELS_FILE]
        assert zf.read(LABELS_FILE).decode().splitlines() == LABELS
        assert zf.getinfo(LABELS_FILE).compress_type == zipfile.ZIP_STORED
    x = np.random.default_rng(1).standard_normal((1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(_run(model, x), _run(plain_model, x))
    # TFLite's schema asks 16-byte alignment for buffer data; our repack keeps it.
    from ai_edge_litert import schema_py_generated as fb
    m = fb.Model.GetRootAs(model, 0)
    for i in range(m.BuffersLength()):
        buf = m.Buffers(i)
        if buf.DataLength():
            assert buf._tab.Vector(buf._tab.Offset(4)) % 16 == 0


def test_repopulating_replaces_and_is_deterministic(plain_model):
    pre = Preprocessing([16, 16], [0.5] * 3, [0.25] * 3)
    first = populate(plain_model, image_classifier_metadata(CARD, pre, input_name="input", output_name="logits",
                                                            labels=LABELS))
    again = populate(plain_model, image_classifier_metadata(CARD, pre, input_name="input", output_name="logits",
                                                            labels=LABELS))
    assert first == again                                   # same inputs, same bytes, same sha256
    card2 = ModelCard(name="renamed", version="2.0")
    second = populate(first, image_classifier_metadata(card2, pre, input_name="input", output_name="logits",
                                                       labels=["a", "b"]))
    md = read_metadata(second)
    assert (md.name, md.version, md.labels) == ("renamed", "2.0", ["a", "b"])
    from ai_edge_litert import schema_py_generated as fb
    m = fb.Model.GetRootAs(second, 0)
    names = [m.Metadata(i).Name().decode() for i in range(m.MetadataLength())]
    assert names.count("TFLITE_METADATA") == 1
    assert associated_files(second) == {LABELS_FILE: b"a\nb\n"}
    assert strip_associated_files(second) != second and read_metadata(strip_associated_files(second)).labels is None


def test_grey_and_bgr_colour_spaces_and_no_labels(plain_model):
    grey = image_classifier_metadata(CARD, Preprocessing([16, 16], [0.13], [0.31], "GRAY"),
                                     input_name="input", output_name="logits")
    md = parse_metadata_buffer(build_metadata_buffer(grey))
    assert md.inputs[0].color_space == "GRAYSCALE" and md.outputs[0].files == [] and md.labels is None
    bgr = image_classifier_metadata(CARD, Preprocessing([16, 16], [0.5] * 3, [0.5] * 3, "BGR"),
                                    input_name="input", output_name="logits")
    assert parse_metadata_buffer(build_metadata_buffer(bgr)).inputs[0].color_space == "UNKNOWN"   # schema has no BGR
    int8 = image_classifier_metadata(CARD, Preprocessing([16, 16], [0.5] * 3, [0.5] * 3),
                                     input_name="input", output_name="logits", input_dtype="int8")
    assert parse_metadata_buffer(build_metadata_buffer(int8)).inputs[0].stats_min is None
    assert metadata_buffer(plain_model) is None and read_metadata(plain_model) is None


def test_metadata_must_match_the_model(plain_model):
    md = image_classifier_metadata(CARD, Preprocessing([16, 16], [0.5] * 3, [0.5] * 3),
                                   input_name="input", output_name="logits")
    md.outputs.append(md.outputs[0])
    with pytest.raises(ValueError, match="2 outputs"):
        populate(plain_model, md)
    with pytest.raises(ValueError, match="M001"):
        parse_metadata_buffer(b"\x00" * 16)
