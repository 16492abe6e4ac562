"""MLP-Mixer: reference counts, token-mixing MACs seen by the counter, forward, training."""
from __future__ import annotations

import pytest
import torch

from models import InputError, create_model
from tests.zoo_checks import check_forward, meta_complexity, train_losses


@pytest.mark.parametrize("name,params,gmacs", [
    # exact parameter counts of timm's mixer_s16_224 / mixer_b16_224; GMACs: 12.6 on timm's
    # mixer_b16_224 model card, S/16's 3.8 is checked against the formula below
    ("mixer_s16_224", 18_528_264, 3.8),
    ("mixer_b16_224", 59_880_472, 12.6),
])
def test_counts_match_timm(name, params, gmacs):
    c = meta_complexity(name, 224)
    assert c.params == params
    assert round(c.macs / 1e9, 1) == gmacs


def _mixer_macs(img: int, patch: int, in_chans: int, dim: int, blocks: int, classes: int) -> int:
    """By hand: patch-embedding conv, per block a token MLP (N -> D/2 -> N on each of D
    channels) and a channel MLP (D -> 4D -> D on each of N tokens), the head."""
    n = (img // patch) ** 2
    stem = n * patch * patch * in_chans * dim
    token = dim * 2 * n * (dim // 2)
    channel = n * 2 * dim * (4 * dim)
    return stem + blocks * (token + channel) + dim * classes


def test_counter_sees_the_token_mixing_matmuls():
    c = meta_complexity("mixer_s16_224", 224)
    assert c.macs == _mixer_macs(224, 16, 3, 512, 8, 1000)
    fc1 = next(layer for layer in c.layers if layer.name == "blocks.0.mlp_tokens.fc1")
    assert fc1.macs == 512 * 196 * 256 and fc1.output_shape == [1, 512, 256]
    small = meta_complexity("mixer", 32, num_classes=10)
    assert small.macs == _mixer_macs(32, 4, 3, 128, 4, 10)


def test_token_mlp_mixes_tokens_and_channel_mlp_does_not():
    torch.manual_seed(0)
    block = create_model("mixer", num_classes=10).eval().blocks[0]
    x = torch.randn(1, 64, 128)          # (batch, tokens, channels)
    x2 = x.clone()
    x2[:, 5] += torch.randn(128)         # change one token

    def token_mix(t):
        return block.mlp_tokens(block.norm1(t).transpose(1, 2)).transpose(1, 2)

    def channel_mix(t):
        return block.mlp_channels(block.norm2(t))

    with torch.no_grad():
        assert not torch.allclose(token_mix(x2)[:, 40], token_mix(x)[:, 40])   # others see it
        c, c2 = channel_mix(x), channel_mix(x2)
    assert torch.equal(c2[:, :5], c[:, :5]) and torch.equal(c2[:, 6:], c[:, 6:])
    assert not torch.allclose(c2[:, 5], c[:, 5])


def test_small_input_forward_and_wrong_size():
    check_forward("mixer")
    model = create_model("mixer_s16_224", num_classes=10, img_size=32).eval()   # 2x2 patches
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(InputError, match="expected 32x32"):
        model(torch.randn(1, 3, 48, 48))


def test_mixer_trains():
    torch.manual_seed(0)
    model = create_model("mixer", num_classes=10)
    losses = train_losses(model, 32, lr=0.05)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_mixer_s16_full_size_forward():
    model = create_model("mixer_s16_224").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
