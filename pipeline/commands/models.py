"""`mdeploy models`: every registered architecture with its params, MACs and input size."""
from __future__ import annotations

import argparse


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("models", parents=[common], help="list the model zoo with params and MACs")
    p.add_argument("pattern", nargs="?", help="fnmatch filter, e.g. 'mobilenet*'")
    p.add_argument("--input-size", type=int, help="count MACs at this resolution instead of each model's default")
    p.add_argument("--num-classes", type=int, default=1000)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    import torch
    from rich.table import Table

    from models import create_model, list_models, model_entry
    from models.complexity import count_complexity

    from models.errors import InputError
    for flag, value, top in (("--input-size", args.input_size, 8192), ("--num-classes", args.num_classes, 1_000_000)):
        if value is not None and not 0 < value <= top:
            raise InputError(flag, f"a positive number up to {top}", str(value))
    rows = []
    names = list_models(args.pattern)
    if not names:
        raise InputError("PATTERN", "a pattern matching a registered model (see `mdeploy models`)",
                         repr(args.pattern))
    with ui.progress() as prog:
        task = prog.add_task("counting", total=len(names), status="")
        for name in names:
            entry = model_entry(name)
            size = args.input_size or entry.input_size
            prog.update(task, status=name)
            with torch.device("meta"):     # shapes only: no weights allocated, no arithmetic done
                model = create_model(name, num_classes=args.num_classes)
                try:
                    macs: int | None = count_complexity(model, size).macs
                except RuntimeError:      # e.g. MLP-Mixer is built for one resolution
                    macs = None
            rows.append({"name": name, "family": entry.family,
                         "params": sum(p.numel() for p in model.parameters()),
                         "macs": macs, "input_size": size, "paper": entry.paper})
            prog.advance(task)
    if args.json:
        ui.emit_json(rows)
        return 0
    table = Table(title=f"mdeploy model zoo ({len(rows)} models, {args.num_classes} classes)")
    for col, just in (("name", "left"), ("family", "left"), ("params", "right"),
                      ("MMACs", "right"), ("input", "right")):
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(r["name"], r["family"], f"{r['params']:,}", f"{r['macs'] / 1e6:,.1f}" if r["macs"] is not None else "n/a",
                      str(r["input_size"]))
    ui.table(table)
    return 0
