"""Checkpoints in and out, safely, and models built from a name or a user's file.

A checkpoint is a safetensors file whose metadata carries what is needed to
rebuild and feed the model (architecture name and kwargs, classes, input size,
normalisation), so ``mdeploy export run/model.safetensors`` needs nothing else.
Foreign checkpoints (``.pt``/``.pth``) are read with ``torch.load(weights_only=True)``:
an untrusted pickle never runs code here.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from models.errors import InputError
from models.registry import create_model
from models.util import error_line

META_KEY = "mdeploy"


def checkpoint_bytes(model: nn.Module, meta: dict[str, Any]) -> bytes:
    """Serialise ``model``'s state dict + ``meta`` as safetensors (caller writes it atomically)."""
    from safetensors.torch import save
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return save(state, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a state dict and its mdeploy metadata (empty for foreign checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "a checkpoint file (.safetensors, .pt, .pth)", "no such file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(path, "a valid safetensors file", error_line(exc)) from None
        return state, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, "a weights-only PyTorch checkpoint (tensors, no pickled code)",
                         error_line(exc)) from None
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "ema"):
            if key in obj and isinstance(obj[key], dict):
                meta = obj.get(META_KEY, {}) if isinstance(obj.get(META_KEY), dict) else {}
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, "a state dict (name -> tensor)", f"a {type(obj).__name__}")
    return _strip_prefix(obj, "module."), meta


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load strictly; a mismatch is a one-line error naming the keys, not a traceback."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        raise InputError(source, f"the {len(own)} keys of {type(model).__name__}", ", ".join(parts))
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise InputError(source, f"{k} of shape {tuple(own[k].shape)}", f"shape {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_factory(spec: str) -> nn.Module:
    """Build a model from ``path/to/file.py:factory`` (a function returning an ``nn.Module``)."""
    file_part, _, func_name = spec.rpartition(":")
    path = Path(file_part)
    if not path.is_file():
        raise InputError(path, "a Python file with a model factory (file.py:function)", "no such file")
    mod_name = f"mdeploy_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as exc:
        raise InputError(path, "an importable Python file", error_line(exc)) from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise InputError(path, f"a function named {func_name!r}", "no such function")
    model = factory()
    if not isinstance(model, nn.Module):
        raise InputError(spec, "a factory returning a torch.nn.Module", f"a {type(model).__name__}")
    return model


def is_factory_spec(spec: str) -> bool:
    return ":" in spec and spec.rpartition(":")[0].endswith(".py")


def build_model(spec: str | None, checkpoint: str | Path | None = None,
                **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The model a user means: a registry name, ``file.py:factory``, or (spec None) the
    architecture recorded in an mdeploy checkpoint; weights from ``checkpoint`` if given.

    Only ``spec`` (what the user typed or put in their own config) may name a Python file:
    a ``file.py:factory`` recorded in a checkpoint's metadata is an error, never imported.

    Returns the model in eval mode and the checkpoint's metadata (merged with overrides).
    A checkpoint whose metadata says ``reparameterized`` holds deploy-form weights: the
    model is re-parameterized before they are loaded.
    """
    state, meta = load_checkpoint(checkpoint) if checkpoint else ({}, {})
    meta = {**meta, **{k: v for k, v in overrides.items() if v is not None}}
    if spec is None:
        spec = meta.get("model")
        if not spec or not isinstance(spec, str):
            raise InputError(checkpoint, "an mdeploy checkpoint naming its model (or give MODEL)",
                             "no model name in its metadata")
        if is_factory_spec(spec):
            # A data file may record the code it came from, but never makes us run it: a
            # checkpoint or export folder from elsewhere would otherwise execute any .py it names.
            raise InputError(checkpoint, f"a registry model (the architecture here comes from code: pass "
                                         f"--model {spec} if you trust that file)",
                             f"metadata naming {spec}")
    if is_factory_spec(spec):
        model = load_factory(spec)
    else:
        kwargs = meta.get("model_kwargs", {})
        if not isinstance(kwargs, dict):
            raise InputError(checkpoint or spec, "model_kwargs: a mapping", f"a {type(kwargs).__name__}")
        model = create_model(spec, num_classes=_positive(meta, "num_classes", 1000, checkpoint or spec),
                             in_chans=_positive(meta, "in_chans", 3, checkpoint or spec), **kwargs)
    meta["model"] = spec
    if meta.get("reparameterized"):
        # deploy-form weights (fused RepVGG branches, frozen shift plans): fuse the freshly
        # built model the same way first, so names and shapes match (models.reparam)
        from models.reparam import reparameterize_model
        model = reparameterize_model(model, inplace=True)
    if checkpoint:
        apply_state_dict(model, state, checkpoint)
    return model.eval(), meta


def _positive(meta: dict[str, Any], key: str, default: int, source: str | Path) -> int:
    """A count read from metadata (which may come from anywhere): a positive integer, or a
    one-line error instead of a traceback deep inside a layer constructor."""
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > 1_000_000:
        raise InputError(source, f"{key}: a positive integer", repr(value)[:40])
    return value
