"""`mdeploy train MODEL --data mnist --epochs N --out DIR`: train on bundled or folder data.

Runs under ``torchrun --nproc_per_node N`` unchanged (DDP over gloo on CPU).
"""
from __future__ import annotations

import argparse
import ast


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _kv(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a typed value: a Python literal (``0.35``, ``10``, ``True``,
    ``(3, 5)``, ``'x'``), also ``true``/``false``/``none`` in any case, else the text as a
    string (``act=relu``), so a factory gets ``width_mult=0.35`` as a float, not ``'0.35'``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a Python name, found {text!r}")
    value = value.strip()
    if value.lower() in _WORDS:
        return key, _WORDS[value.lower()]
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key, value


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    from pipeline.stages.train import TrainConfig
    d = TrainConfig()
    p = sub.add_parser("train", parents=[common], help="train a zoo model on bundled or folder data",
                       description="Train a registered model. DATA is a bundled set (mnist, digits) "
                                   "or an ImageFolder-layout folder. Under torchrun it trains with DDP.")
    p.add_argument("model", help="registered model name (see `mdeploy models`)")
    p.add_argument("--data", default=d.data, help=f"mnist | digits | path to an image folder (default {d.data})")
    p.add_argument("--out", required=True, help="output folder for model.safetensors and train_log.json")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--input-size", type=int, help="resize inputs to N x N (default: the data's size)")
    p.add_argument("--train-samples", type=int, help="train on a stratified subset of N images")
    p.add_argument("--no-augment", action="store_true", help="no random translation")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: the cores free when training starts)")
    p.add_argument("--model-arg", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model factory (JSON value), e.g. width_mult=0.5")
    p.add_argument("--shift-l1", type=float, default=d.shift_l1, metavar="LAMBDA",
                   help="L1 penalty LAMBDA * sum(|dy|+|dx|) on sparse shift displacements, which "
                        "drives them to zero (models with sparse shifts, e.g. fe_net_tiny; 2e-4 "
                        "kept fe_net_tiny within 1 point of LAMBDA=0 with 43%% of shifts zero)")
    p.add_argument("--freeze-shifts-after", type=int, metavar="EPOCH",
                   help="snap sparse shift displacements to integers after EPOCH and train the "
                        "rest of the net around them")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from models.errors import InputError
    from pipeline.stages.train import TrainConfig
    try:
        return TrainConfig(
            model=args.model, model_kwargs=dict(args.model_arg), data=args.data,
            input_size=args.input_size, epochs=args.epochs, batch_size=args.batch_size,
            optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
            label_smoothing=args.label_smoothing, train_samples=args.train_samples,
            augment=not args.no_augment, seed=args.seed, threads=args.threads,
            shift_l1=args.shift_l1, freeze_shifts_after=args.freeze_shifts_after)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError("train options", f"--{'-'.join(map(str, err['loc'])).replace('_', '-')} "
                         f"{err['msg'].lower()}", repr(err.get("input"))) from None


def progress_printer(ui, prog, model: str):
    """A training progress callback: a bar over steps, one line per epoch."""
    task = prog.add_task(f"training {model}", total=None, status="")

    def on_progress(phase: str, step: int, total: int, info: dict) -> None:
        if phase == "train":
            prog.update(task, completed=step, total=total,
                        status=f"epoch {info['epoch']} loss {info['loss']:.3f}")
        else:
            ui.info(f"epoch {step}/{total}: train loss {info['train_loss']:.4f} "
                    f"acc {info['train_acc']:.4f} | val loss {info['val_loss']:.4f} "
                    f"acc {info['val_acc']:.4f} | {info['seconds']:.1f}s")
    return on_progress


def run(args: argparse.Namespace, ui) -> int:
    import os

    from models import model_entry
    from pipeline.stages.train import train
    cfg = config_from_args(args)
    model_entry(cfg.model)     # unknown name -> one-line error before any work
    rank = int(os.environ.get("RANK", "0"))
    quiet_rank = rank != 0
    with ui.progress() as prog:
        result = train(cfg, args.out, force=args.force,
                       progress=None if quiet_rank else progress_printer(ui, prog, cfg.model))
    if quiet_rank:
        return 0
    summary = {"checkpoint": str(result.checkpoint), "best_epoch": result.best_epoch,
               "val_acc": result.best_val_acc, "test_acc": result.test_acc,
               "world_size": result.world_size}
    shifts = result.meta.get("sparse_shift")
    if shifts:
        summary["sparse_shift"] = shifts
    if args.json:
        ui.emit_json(summary)
        return 0
    if shifts:
        show_shift_stats(ui, shifts)
    ui.result(f"best epoch {result.best_epoch}: val acc {result.best_val_acc:.4f}, "
              f"held-out test acc {result.test_acc:.4f} -> {result.checkpoint}")
    return 0


def show_shift_stats(ui, shifts: dict) -> None:
    """Per-layer and overall zero-displacement fractions and displacement histograms."""
    def top(hist: dict, n: int = 4) -> str:
        total = sum(hist.values()) or 1
        return " ".join(f"{k}:{v / total:.0%}" for k, v in list(hist.items())[:n])

    rows = [[layer["name"], str(layer["channels"]), f"{layer['zero_fraction']:.1%}",
             str(layer["max_abs"]), top(layer["histogram"])] for layer in shifts["layers"]]
    rows.append(["all", str(shifts["channels"]), f"{shifts['zero_fraction']:.1%}",
                 str(max((layer["max_abs"] for layer in shifts["layers"]), default=0)),
                 top(shifts["histogram"])])
    from rich.table import Table
    table = Table(title=f"sparse shifts (lambda {shifts['lambda']:g}): channels with zero displacement")
    for col in ("layer", "channels", "zero", "max |d|", "most common (dy,dx)"):
        table.add_column(col, justify="left" if col in ("layer", "most common (dy,dx)") else "right")
    for row in rows:
        table.add_row(*row)
    ui.table(table)
