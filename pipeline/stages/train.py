"""Training: a real loop on real bundled data, single-process or DDP under torchrun.

Determinism is designed in so a 2-process DDP run can be checked against a
1-process run: every epoch draws one global permutation (seeded by seed+epoch),
cuts it into global batches of ``batch_size`` (last partial batch dropped), and
rank r of W takes rows r::W of each global batch. Augmentation is drawn per global
batch from its own seeded generator before the split. With gradients averaged by
DDP, the only difference from one process is then per-process BatchNorm statistics
(SyncBatchNorm needs CUDA), plus float summation order; a model without BN (e.g.
``mixer``, LayerNorm only) ends with the same weights to ~1e-6.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from exporters.fileio import (atomic_write_bytes, atomic_write_text, check_distinct_from_inputs,
                             check_writable_output, staged_output_dir)
from models import create_model, model_entry
from models.checkpoint import checkpoint_bytes
from models.cpu import default_threads
from models.datasets import ImageSet, _stratified_pick, dataset_stats, load_dataset, to_model_input

CHECKPOINT_NAME = "model.safetensors"


class TrainConfig(BaseModel):
    """Everything that decides a training run; validated, serialised into the checkpoint."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "mobilenet_v2"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    data: str = "mnist"
    input_size: int | None = Field(None, gt=0, le=8192, description="default: the data's own size")
    epochs: int = Field(6, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1, le=65536, description="a larger batch is a typo, not a plan")
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    warmup_epochs: float = Field(0.5, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    train_samples: int | None = Field(None, ge=1, description="use a stratified subset (fast tests)")
    augment: bool = True
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    shift_l1: float = Field(0.0, ge=0, description="L1 penalty on sparse shift displacements")
    freeze_shifts_after: int | None = Field(None, ge=0, description="freeze shifts after epoch N")


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)    # what the hooks report


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_val_acc: float
    test_acc: float
    history: list[EpochLog] = field(default_factory=list)
    world_size: int = 1
    meta: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[str, int, int, dict[str, Any]], None]   # (phase, step, total, info)


class TrainHook(Protocol):
    """What a training hook may implement (every method is optional, looked up by name):

    * ``param_groups(model) -> list[dict]``: optimizer groups for some parameters, each
      ``{"params": [...], "lr_scale": float, "weight_decay": float}`` (the rest of the
      model keeps the config's settings; ``lr_scale`` multiplies the scheduled rate);
    * ``on_epoch_start(model, epoch)`` (0-based epoch), e.g. freeze parameters;
    * ``loss(model) -> Tensor | None``: a term added to the task loss (a regularizer);
    * ``after_backward(model)``: edit gradients before the optimizer step;
    * ``on_epoch_end(model, epoch) -> dict``: figures logged with the epoch;
    * ``summary(model) -> dict``: merged into the checkpoint metadata at the end (after the
      best weights are restored).

    ``model`` is the bare model, never the DDP wrapper. Hooks keep method-specific
    training out of the loop: the loop only calls these.
    """


def training_hooks(cfg: TrainConfig, model: nn.Module) -> list[Any]:
    """The hooks a config asks for (or that the model needs to be reported on)."""
    from quantize.shift import SparseShiftHook, has_sparse_shifts
    hooks: list[Any] = []
    shifts = has_sparse_shifts(model)
    if (cfg.shift_l1 > 0 or cfg.freeze_shifts_after is not None) and not shifts:
        from models.errors import InputError
        flag = "--shift-l1" if cfg.shift_l1 > 0 else "--freeze-shifts-after"
        raise InputError(flag, "a model with sparse shift layers (e.g. fe_net_tiny)", cfg.model)
    if shifts:
        hooks.append(SparseShiftHook(cfg.shift_l1, cfg.freeze_shifts_after))
    return hooks


def check_options(cfg: TrainConfig) -> None:
    """Fail on options the model cannot take before any data is loaded (a shape-only
    build on the meta device costs no memory)."""
    with torch.device("meta"):
        training_hooks(cfg, create_model(cfg.model, **cfg.model_kwargs))


def _call(hooks: Sequence[Any], method: str, *args: Any) -> list[Any]:
    return [getattr(h, method)(*args) for h in hooks if callable(getattr(h, method, None))]


def _dist_info() -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), ws


def _batches(n: int, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed * 1000 + epoch).permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` px (zero fill in normalised space = background)."""
    pad = F.pad(x, (max_shift,) * 4, value=float(x.amin()))
    h, w = x.shape[-2:]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return pad[..., dy:dy + h, dx:dx + w]


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256
              ) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            out = model(x[i:i + batch])
            loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
            correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    return loss / max(1, len(y)), correct / max(1, len(y))


def train(cfg: TrainConfig, out_dir: str | Path, *, force: bool = False,
          progress: ProgressFn | None = None, hooks: Sequence[Any] = ()) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; keep the best-on-validation weights.

    Writes ``model.safetensors`` (with the metadata that export/verify need) and
    ``train_log.json`` into ``out_dir``, built in a staging sibling and renamed into place
    (``staged_output_dir``). Under torchrun, only rank 0 writes.
    ``hooks`` (see ``TrainHook``) come before the ones the config implies.
    """
    out_dir = Path(out_dir)
    rank, world = _dist_info()
    if rank == 0:
        check_distinct_from_inputs(out_dir, cfg.data)     # an image folder is an input
        check_writable_output(out_dir, force)
    check_options(cfg)
    # the free cores unless named: torch would take every core and fight whatever else runs
    torch.set_num_threads(cfg.threads or max(1, default_threads() // world))
    torch.manual_seed(cfg.seed)
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo")

    train_all = load_dataset(cfg.data, "train")
    if not train_all.labelled:
        from models.errors import InputError
        raise InputError(f"--data {cfg.data}", "a labelled data set (mnist, digits or class folders)",
                         "an unlabelled set (calibration and evaluation only)")
    if len(train_all.classes or ()) < 2 or len(np.unique(train_all.labels)) < 2:
        from models.errors import InputError
        raise InputError(f"--data {cfg.data}", "images of at least two classes to train a classifier",
                         f"{len(np.unique(train_all.labels))} class with images")
    if cfg.train_samples:
        train_all = train_all.subset(cfg.train_samples, seed=cfg.seed)
    test_set = load_dataset(cfg.data, "test")
    val_idx = _stratified_pick(train_all.labels, int(round(len(train_all) * cfg.val_fraction)), cfg.seed)
    mask = np.zeros(len(train_all), bool)
    mask[val_idx] = True
    tr = ImageSet(train_all.images[~mask], train_all.labels[~mask], train_all.classes, train_all.name)
    va = ImageSet(train_all.images[mask], train_all.labels[mask], train_all.classes, train_all.name)

    entry = model_entry(cfg.model)
    in_chans = tr.channels
    input_size = cfg.input_size or int(tr.images.shape[1])
    mean, std = dataset_stats(tr.images)

    def tensors(s: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(to_model_input(s.images, input_size, tuple(mean), tuple(std))),
                torch.from_numpy(s.labels))

    xtr, ytr = tensors(tr)
    xva, yva = tensors(va)
    xte, yte = tensors(test_set)

    model = create_model(cfg.model, num_classes=len(tr.classes), in_chans=in_chans, **cfg.model_kwargs)
    hooks = [*hooks, *training_hooks(cfg, model)]
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net: nn.Module = DDP(model)
    else:
        net = model
    claimed = [g for groups in _call(hooks, "param_groups", model) for g in groups]
    claimed_ids = {id(p) for g in claimed for p in g["params"]}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed_ids]
    groups = [{"params": params}, *claimed]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps_per_epoch = len(_batches(len(ytr), cfg.batch_size, 0, cfg.seed))
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} is larger than the {len(ytr)} training images")
    total = steps_per_epoch * cfg.epochs
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:   # linear warm-up, then cosine to zero
        if step < warm:
            return cfg.lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    meta = {
        "model": cfg.model, "model_kwargs": cfg.model_kwargs, "num_classes": len(tr.classes),
        "in_chans": in_chans, "input_size": input_size, "mean": mean, "std": std,
        "channel_order": "GRAY" if in_chans == 1 else "RGB", "labels": tr.classes,
        "data": cfg.data, "train_config": cfg.model_dump(), "family": entry.family,
    }
    history: list[EpochLog] = []
    best_acc, best_epoch, best_state = -1.0, -1, None
    step = 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        _call(hooks, "on_epoch_start", model, epoch)
        net.train()
        run_loss, run_correct, seen = 0.0, 0, 0
        for bi, idx in enumerate(_batches(len(ytr), cfg.batch_size, epoch, cfg.seed)):
            xb, yb = xtr[idx], ytr[idx]
            if cfg.augment:
                gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 100003 + bi)
                xb = _augment(xb, gen)
            xb, yb = xb[rank::world], yb[rank::world]
            for g in opt.param_groups:
                g["lr"] = lr_at(step) * g.get("lr_scale", 1.0)
            out = net(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=cfg.label_smoothing)
            extra = [t for t in _call(hooks, "loss", model) if t is not None]
            opt.zero_grad(set_to_none=True)
            (loss + sum(extra) if extra else loss).backward()
            _call(hooks, "after_backward", model)
            opt.step()
            step += 1
            run_loss += loss.item() * len(yb)
            run_correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
            if progress and rank == 0:
                progress("train", step, total, {"epoch": epoch + 1, "loss": run_loss / seen})
        val_loss, val_acc = _evaluate(model, xva, yva)
        logged: dict[str, Any] = {}
        for figures in _call(hooks, "on_epoch_end", model, epoch):
            logged.update(figures or {})
        history.append(EpochLog(epoch + 1, run_loss / max(1, seen), run_correct / max(1, seen),
                                val_loss, val_acc, lr_at(step - 1), time.perf_counter() - t0,
                                logged))
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress and rank == 0:
            progress("epoch", epoch + 1, cfg.epochs, asdict(history[-1]))

    assert best_state is not None
    model.load_state_dict(best_state)
    _, test_acc = _evaluate(model, xte, yte)
    for summary in _call(hooks, "summary", model):
        meta.update(summary or {})
    meta.update(best_epoch=best_epoch, val_acc=round(best_acc, 5), test_acc=round(test_acc, 5),
                world_size=world)
    ckpt = out_dir / CHECKPOINT_NAME
    if rank == 0:
        # checkpoint and log appear together or not at all: a kill or a full disk between
        # the two writes must not leave a checkpoint without its log that a rerun refuses
        import json
        with staged_output_dir(out_dir, force) as stage:
            atomic_write_bytes(stage / CHECKPOINT_NAME, checkpoint_bytes(model, meta))
            atomic_write_text(stage / "train_log.json", json.dumps(
                {"meta": meta, "history": [asdict(h) for h in history]}, indent=2) + "\n")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
    return TrainResult(ckpt, best_epoch, best_acc, test_acc, history, world, meta)
