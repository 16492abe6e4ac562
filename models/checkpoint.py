"""Checkpoints in and out, safely, and models built from a name or a user's file.

A checkpoint is a safetensors file whose metadata carries what is needed to
rebuild and feed the model (architecture name and kwargs, classes, input size,
normalisation), so ``mdeploy export run/model.safetensors`` needs nothing else.
Foreign checkpoints (``.pt``/``.pth``) are read with ``torch.load(weights_only=True)``:
an untrusted pickle never runs code here.
"""
from __future__ import annotations

import hashlib
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


def load_factory(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a model from ``path/to/file.py:factory`` (a function returning an ``nn.Module``),
    called with ``kwargs`` (``--model-arg``). Whatever the factory raises (a missing
    argument, its own checks) is a one-line error naming the file, the factory and the
    exception: the user's code, not ours, so no traceback."""
    kwargs = dict(kwargs or {})
    file_part, _, func_name = spec.rpartition(":")
    path = Path(file_part)
    if not path.is_file():
        raise InputError(path, "a Python file with a model factory (file.py:function)", "no such file")
    # a stable module name: it lands in exported graphs (class paths in node metadata), so
    # it must not change from run to run (``hash()`` of a str is salted per process)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    mod_name = f"mdeploy_user_{_identifier(path.stem)}_{digest}"
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
    call = f"{func_name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        model = factory(**kwargs)
    except Exception as exc:         # the user's factory: any error is theirs to read in one line
        hint = "" if kwargs else " (arguments go in --model-arg KEY=VALUE)"
        raise InputError(path, f"factory {call} to return a model{hint}", error_line(exc)) from None
    if not isinstance(model, nn.Module):
        raise InputError(path, f"factory {call} to return a torch.nn.Module", f"a {type(model).__name__}")
    return model


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def is_factory_spec(spec: str) -> bool:
    return ":" in spec and spec.rpartition(":")[0].endswith(".py")


def is_program_spec(spec: str) -> bool:
    """A ``torch.export`` program file (``torch.export.save``), by its ``.pt2`` suffix."""
    return spec.lower().endswith(".pt2")


class ExportedProgramModel(nn.Module):
    """An ``nn.Module`` around ``ExportedProgram.module()``, so every stage can use a
    ``.pt2`` program as it uses any model: the unlifted graph refuses ``eval()`` (it is
    already in the mode it was exported in) and, exported with a static batch, guards
    the batch size; this wrapper keeps ``eval()`` harmless and runs a larger batch one
    sample at a time (what verify's batched reference needs)."""

    def __init__(self, program: Any, batch: int | None) -> None:
        super().__init__()
        self.program = program
        self.batch = batch

    def train(self, mode: bool = True) -> "ExportedProgramModel":
        self.training = bool(mode)      # a flag only: the graph keeps the mode it was exported in
        return self

    def forward(self, x: torch.Tensor) -> Any:
        if self.batch == 1 and x.shape[0] != 1:
            outs = [self.program(x[i:i + 1]) for i in range(x.shape[0])]
            if all(isinstance(o, torch.Tensor) for o in outs):
                return torch.cat(outs)
        return self.program(x)


def program_input_shape(program: Any) -> list[int] | None:
    """The static shape of a program's first user input (its example), or None."""
    names = list(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and names and node.name == names[0]:
            val = node.meta.get("val")
            try:
                return [int(d) for d in val.shape]
            except (AttributeError, TypeError):         # symbolic dimensions
                return None
    return None


def load_program(path: str | Path) -> tuple[nn.Module, list[int] | None]:
    """A ``.pt2`` file from ``torch.export.save`` as a module, with its input shape.

    NOT safe for untrusted files: ``torch.export.load`` unpickles the weights and constants
    (``torch.load(weights_only=False)`` and ``pickle.loads`` inside torch 2.13's
    ``torch/export/pt2_archive/_package.py``; its docs: "Never load data from an untrusted
    source"). Load only programs you made or trust, like a ``file.py:factory``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "a torch.export program (.pt2, from torch.export.save)", "no such file")
    import logging
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)          # it logs a traceback before trying the old format
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise InputError(path, "a torch.export program (.pt2, from torch.export.save)", error_line(exc)) from None
    finally:
        logger.setLevel(level)
    shape = program_input_shape(program)
    batch = shape[0] if shape else None
    return ExportedProgramModel(program.module(), batch), shape


def build_model(spec: str | None, checkpoint: str | Path | None = None,
                **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The model a user means: a registry name, ``file.py:factory`` (called with the
    metadata's ``model_kwargs``), a ``torch.export`` program (``.pt2``), or (spec None) the
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
        if is_factory_spec(spec) or is_program_spec(spec):
            # A data file may record the code it came from, but never makes us run it: a
            # checkpoint or export folder from elsewhere would otherwise execute any .py it
            # names, or unpickle any .pt2 program (torch.export.load is not weights-only).
            raise InputError(checkpoint, f"a registry model (the architecture here comes from code: pass "
                                         f"--model {spec} if you trust that file)",
                             f"metadata naming {spec}")
    if is_factory_spec(spec):
        model = load_factory(spec, meta.get("model_kwargs"))
    elif is_program_spec(spec):
        model, _ = load_program(spec)
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
