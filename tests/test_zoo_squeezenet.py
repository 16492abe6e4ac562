"""SqueezeNet 1.0/1.1: reference counts, the paper's bypass variants, forward, training."""
from __future__ import annotations

import pytest
import torch

from models import InputError, create_model, model_entry
from models.squeezenet import Fire
from tests.zoo_checks import check_forward, meta_complexity, train_losses

# Fire modules fire2..fire9 as (input channels, output channels), paper Table 1 (v1.0)
# and the DeepScale v1.1 prototxt: in both, fire3/5/7/9 keep their width.
FIRE_CHANNELS = {
    "squeezenet1_0": [(96, 128), (128, 128), (128, 256), (256, 256),
                      (256, 384), (384, 384), (384, 512), (512, 512)],
    "squeezenet1_1": [(64, 128), (128, 128), (128, 256), (256, 256),
                      (256, 384), (384, 384), (384, 512), (512, 512)],
}


def _fires(model) -> list[Fire]:
    return [m for m in model.modules() if isinstance(m, Fire)]


# torchvision docs (SqueezeNet1_0_Weights / SqueezeNet1_1_Weights): 1,248,424 and
# 1,235,496 params, 0.82 and 0.35 GFLOPS (torchvision's "GFLOPS" are multiply-adds,
# printed to 2 decimals). The paper gives no MAC figure.
@pytest.mark.parametrize("name,params,gmacs", [("squeezenet1_0", 1_248_424, 0.82),
                                               ("squeezenet1_1", 1_235_496, 0.35)])
def test_counts_match_torchvision(name, params, gmacs):
    c = meta_complexity(name)
    assert c.params == params
    assert round(c.macs / 1e9, 2) == gmacs


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
def test_fire_channels_follow_the_paper(name):
    fires = _fires(create_model(name))
    assert [(f.squeeze.in_channels, f.out_channels) for f in fires] == FIRE_CHANNELS[name]


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
def test_bypass_placement_and_params(name):
    none, simple, complex_ = (create_model(name, bypass=b) for b in ("none", "simple", "complex"))
    kinds = {"none": [], "simple": [], "complex": []}
    for label, model in (("none", none), ("simple", simple), ("complex", complex_)):
        for f in _fires(model):
            kinds[label].append(None if f.bypass is None else
                                "identity" if isinstance(f.bypass, torch.nn.Identity) else "conv")
    # paper Sec. 6: simple bypass around fire3, 5, 7, 9; complex adds 1x1 convs around 2, 4, 6, 8
    assert kinds["none"] == [None] * 8
    assert kinds["simple"] == [None, "identity"] * 4
    assert kinds["complex"] == ["conv", "identity"] * 4

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(simple) == count(none)                     # a wire has no weights
    # a biased 1x1 conv from each mismatched module's input width to its output width
    delta = sum(i * o + o for i, o in FIRE_CHANNELS[name] if i != o)
    assert count(complex_) - count(none) == delta


def test_bypass_is_applied_in_forward():
    # Same weights with and without the identity bypass: fire3's output gains its input.
    torch.manual_seed(0)
    none = create_model("squeezenet1_1", bypass="none").eval()
    simple = create_model("squeezenet1_1", bypass="simple").eval()
    simple.load_state_dict(none.state_dict())
    fire3_plain, fire3_bypass = _fires(none)[1], _fires(simple)[1]
    x = torch.rand(1, 128, 9, 9)
    with torch.no_grad():
        assert torch.allclose(fire3_bypass(x), fire3_plain(x) + x)
        full = torch.randn(1, 3, 64, 64)
        assert not torch.allclose(none(full), simple(full))


def test_state_dict_keys_follow_torchvision():
    # torchvision's squeezenet1_0 layout: Fire modules at features.3-5, 7-10, 12; final conv
    # at classifier.1. Same keys, so its state dicts load as they are.
    keys = set(create_model("squeezenet1_0").state_dict())
    fire_keys = {f"features.{i}.{conv}.{p}" for i in (3, 4, 5, 7, 8, 9, 10, 12)
                 for conv in ("squeeze", "expand1x1", "expand3x3") for p in ("weight", "bias")}
    assert keys == fire_keys | {"features.0.weight", "features.0.bias",
                                "classifier.1.weight", "classifier.1.bias"}


def test_identity_bypass_needs_equal_widths():
    with pytest.raises(ValueError, match="in == out"):
        Fire(96, 16, 64, 64, bypass="identity")
    with pytest.raises(InputError, match="bypass"):
        create_model("squeezenet1_0", bypass="residual")


def test_registry_entries():
    for name in FIRE_CHANNELS:
        e = model_entry(name)
        assert (e.input_size, e.small_input_size, e.family) == (224, 32, "squeezenet")


@pytest.mark.parametrize("name,bypass", [("squeezenet1_0", "none"), ("squeezenet1_1", "complex")])
def test_small_input_forward(name, bypass):
    check_forward(name)
    model = create_model(name, num_classes=10, in_chans=1, bypass=bypass).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
def test_training_step_lowers_the_loss(name):
    # No BN: a small step (lr 1e-3) is what the He-initialised, unnormalised net takes;
    # at 1e-2 the final ReLU can die and pin the loss at ln(10).
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, drop_rate=0.0)
    losses = train_losses(model, 32, steps=1, batch=4, lr=1e-3)
    assert losses[-1] < losses[0]


def test_full_size_forward():
    model = create_model("squeezenet1_1").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all() and (out >= 0).all()
