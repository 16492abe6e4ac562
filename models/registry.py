"""Every architecture is a name: ``create_model("mobilenet_v2", num_classes=10)``.

Borrowed from timm: a factory function registers itself with the input size it
was designed for, so tools (``mdeploy models``, the zoo tests, the benchmarks)
can iterate the zoo without a hand-kept list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from models.errors import InputError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    input_size: int          # the resolution the paper trains at
    small_input_size: int    # smallest resolution the architecture handles (fast tests)
    family: str
    paper: str
    # the preprocessing the architecture's published weights expect (timm's pretrained_cfg):
    # {"mean": [...], "std": [...]} on [0, 1] pixels; None: not known, the caller decides
    pretrained_cfg: dict | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    input_size: int = 224,
    small_input_size: int = 64,
    family: str = "",
    paper: str = "",
    name: str | None = None,
    pretrained_cfg: dict | None = None,
):
    """Decorator: ``@register_model(input_size=224, small_input_size=32)``."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} registered twice")
        _REGISTRY[key] = ModelEntry(key, f, input_size, small_input_size,
                                    family or f.__module__.rsplit(".", 1)[-1], paper, pretrained_cfg)
        return f

    return wrap(fn) if fn is not None else wrap


def _ensure_loaded() -> None:
    # Importing the package imports every architecture module, which registers them.
    import models  # noqa: F401


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is an fnmatch filter (``"mobilenet*"``)."""
    _ensure_loaded()
    names = sorted(_REGISTRY)
    if pattern:
        import fnmatch
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def model_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see `mdeploy models`)"
        raise InputError("model name", f"a registered model{hint}", repr(name)) from None


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a registered model; extra keyword arguments go to its factory."""
    entry = model_entry(name)
    try:
        return entry.factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise InputError(f"model {name}", "valid keyword arguments", str(exc)) from None
