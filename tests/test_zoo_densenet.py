"""DenseNet-BC: reference counts, growth/compression arithmetic, ONNX-friendly concat, training."""
from __future__ import annotations

import pytest
import torch

from models import InputError, create_model, model_entry
from models.densenet import DenseBlock, DenseLayer, Transition
from tests.zoo_checks import check_forward, meta_complexity, train_losses

IMAGENET = ["densenet121", "densenet169", "densenet201", "densenet161"]


# torchvision docs (DenseNet*_Weights.IMAGENET1K_V1): exact params and "GFLOPS" (multiply-adds,
# printed to 2 decimals). Keras applications DenseNet121: 7,978,856 trainable params as well.
@pytest.mark.parametrize("name,params,gmacs", [
    ("densenet121", 7_978_856, 2.83), ("densenet169", 14_149_480, 3.36),
    ("densenet201", 20_013_928, 4.29), ("densenet161", 28_681_000, 7.73),
])
def test_imagenet_counts_match_torchvision(name, params, gmacs):
    c = meta_complexity(name)
    assert c.params == params
    assert round(c.macs / 1e9, 2) == gmacs


def test_densenet_bc_100_k12_count():
    # DenseNet paper Table 2: DenseNet-BC (L=100, k=12) has 0.8M params; osmr/imgclsmob
    # "DenseNet-BC-100 (k=12)" on CIFAR-10: 769,162 exactly. (Its 298.45M "FLOPs" count
    # more than multiply-adds, so there is no MAC figure to compare with.)
    c = meta_complexity("densenet_cifar", 32, num_classes=10)
    assert c.params == 769_162
    model = create_model("densenet_cifar", num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    assert [len(b) for b in blocks] == [16, 16, 16]     # (100 - 4) / 6 per block
    assert model.features.conv0.kernel_size == (3, 3) and model.features.conv0.out_channels == 24


def test_channel_arithmetic_growth_and_compression():
    model = create_model("densenet121")
    widths = []
    for name, m in model.features.named_children():
        if isinstance(m, DenseBlock):
            widths.append(m.out_channels)
        elif isinstance(m, Transition):
            widths.append(m.conv.out_channels)
    # 64 + 6*32 = 256 -> 128; 128 + 12*32 = 512 -> 256; 256 + 24*32 = 1024 -> 512; 512 + 16*32
    assert widths == [256, 128, 512, 256, 1024, 512, 1024]
    assert model.num_features == 1024
    # compression 1.0 keeps the width (DenseNet-B without C)
    assert create_model("densenet121", compression=1.0).num_features == 64 + 32 * (6 + 12 + 24 + 16)


def test_dense_layer_is_preactivation_with_bottleneck():
    layer = DenseLayer(64, growth_rate=32, bn_size=4)
    names = [n for n, _ in layer.named_children()]
    assert names[:6] == ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]
    assert layer.conv1.out_channels == 4 * 32 and layer.conv2.out_channels == 32
    assert layer.conv1.bias is None and layer.conv2.bias is None


def test_dense_block_keeps_its_input_and_concatenates():
    torch.manual_seed(0)
    block = DenseBlock(3, 8, growth_rate=4).eval()
    x = torch.randn(1, 8, 5, 5)
    x0 = x.clone()
    with torch.no_grad():
        out = block(x)
    assert torch.equal(x, x0)                  # the in-place ReLUs never touch the input
    assert out.shape == (1, 8 + 3 * 4, 5, 5)
    assert torch.equal(out[:, :8], x)          # the input passes through unchanged
    with torch.no_grad():
        assert torch.allclose(out[:, 8:12], block["denselayer1"](x))


def test_state_dict_keys_follow_torchvision():
    keys = set(create_model("densenet121").state_dict())
    assert {"features.conv0.weight", "features.norm0.running_var",
            "features.denseblock1.denselayer1.norm1.weight",
            "features.denseblock1.denselayer6.conv2.weight",
            "features.transition3.conv.weight", "features.denseblock4.denselayer16.norm2.bias",
            "features.norm5.weight", "classifier.weight", "classifier.bias"} <= keys


def test_bad_arguments_are_input_errors():
    with pytest.raises(InputError, match="compression"):
        create_model("densenet121", compression=0)
    with pytest.raises(InputError, match="stem"):
        create_model("densenet121", stem="tiny")


def test_registry_entries():
    for name in IMAGENET:
        e = model_entry(name)
        assert (e.input_size, e.small_input_size, e.family) == (224, 32, "densenet")
    e = model_entry("densenet_cifar")
    assert (e.input_size, e.small_input_size) == (32, 32)


@pytest.mark.parametrize("name", ["densenet121", "densenet_cifar"])
def test_small_input_forward(name):
    check_forward(name)


@pytest.mark.parametrize("name", ["densenet_cifar", "densenet121"])
def test_training_step_lowers_the_loss(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    losses = train_losses(model, 32, steps=1, batch=4, lr=0.01)
    assert losses[-1] < losses[0]


def test_full_size_forward():
    model = create_model("densenet121").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.slow
def test_full_size_forward_densenet161():
    model = create_model("densenet161").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
