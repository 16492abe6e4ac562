"""MLP-Mixer (Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021).

A patch-embedding conv, then blocks that alternate a token-mixing MLP (across
patches, per channel) and a channel-mixing MLP (across channels, per patch),
each pre-LayerNorm with a residual add; global average over tokens, linear head.

Token mixing is written as ``nn.Linear`` on the transposed ``(B, C, N)`` tensor:
it exports to ONNX as Transpose + MatMul + Add, which every runtime here maps to
a fully connected kernel, and ``count_complexity`` sees its MACs (it is an aten
``mm``). Module names and weight init follow timm's ``MlpMixer``, so its
checkpoints load as they are.

The token MLP's size is the number of patches, so a Mixer runs at exactly the
resolution it was built for; ``img_size=`` builds it for another one.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.errors import InputError
from models.registry import register_model

_PAPER = "Tolstikhin et al. 2021, MLP-Mixer: An all-MLP Architecture for Vision"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear over the last dimension."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class MixerBlock(nn.Module):
    """x + TokenMLP(LN(x)^T)^T, then x + ChannelMLP(LN(x)); x is (B, tokens, channels)."""

    def __init__(self, dim: int, seq_len: int, mlp_ratio: tuple[float, float] = (0.5, 4.0),
                 drop: float = 0.0) -> None:
        super().__init__()
        tokens_dim, channels_dim = int(mlp_ratio[0] * dim), int(mlp_ratio[1] * dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(seq_len, tokens_dim, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_dim, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear embedding, as a stride=patch conv; (B, N, C) out."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            # a shape check, not data-dependent: shapes are static under export
            raise InputError("Mixer input", f"{self.img_size}x{self.img_size} images "
                             "(build the model with img_size= for another size)",
                             "x".join(str(int(s)) for s in x.shape[-2:]))
        return self.proj(x).flatten(2).transpose(1, 2)


class MlpMixer(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                 patch_size: int = 16, num_blocks: int = 8, embed_dim: int = 512,
                 mlp_ratio: tuple[float, float] = (0.5, 4.0), drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.stem = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.blocks = nn.Sequential(*[
            MixerBlock(embed_dim, self.stem.num_patches, mlp_ratio, drop_rate)
            for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        for name, m in self.named_modules():
            _init_weights(m, name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x).mean(dim=1)))


def _lecun_normal_(w: torch.Tensor) -> None:
    # truncated normal at +-2 std with variance 1/fan_in (JAX's lecun_normal); the
    # constant is the std of a unit normal truncated to [-2, 2]
    fan_in = w.shape[1] * math.prod(w.shape[2:])
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def _init_weights(m: nn.Module, name: str) -> None:
    # timm's MlpMixer init (the paper's released code): zero head, Xavier-uniform
    # linears with tiny-normal MLP biases, LeCun-normal patch embedding.
    if isinstance(m, nn.Linear):
        if name.startswith("head"):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        else:
            nn.init.xavier_uniform_(m.weight)
            if "mlp" in name:
                nn.init.normal_(m.bias, std=1e-6)
            else:
                nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        _lecun_normal_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@register_model(input_size=224, small_input_size=224, paper=_PAPER)
def mixer_s16_224(num_classes: int = 1000, in_chans: int = 3, **kw) -> MlpMixer:
    """Mixer-S/16: 8 blocks, width 512; 18,528,264 params, 3.78 GMACs at 224."""
    return MlpMixer(num_classes, in_chans, patch_size=16, num_blocks=8, embed_dim=512, **kw)


@register_model(input_size=224, small_input_size=224, paper=_PAPER)
def mixer_b16_224(num_classes: int = 1000, in_chans: int = 3, **kw) -> MlpMixer:
    """Mixer-B/16: 12 blocks, width 768; 59,880,472 params, 12.6 GMACs at 224."""
    return MlpMixer(num_classes, in_chans, patch_size=16, num_blocks=12, embed_dim=768, **kw)


@register_model(input_size=32, small_input_size=32, paper=_PAPER)
def mixer(num_classes: int = 1000, in_chans: int = 3, **kw) -> MlpMixer:
    """Not from the paper: a 32x32 Mixer (patch 4 -> 64 tokens, 4 blocks, width 128)."""
    kw.setdefault("img_size", 32)
    return MlpMixer(num_classes, in_chans, patch_size=4, num_blocks=4, embed_dim=128, **kw)
