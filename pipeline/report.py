"""The run report: one JSON for machines, Markdown for a PR comment, HTML with plots.

Plots are what people would rather see than read: the training curve, accuracy
vs size per artifact (the deployment trade-off), and the parity error of every
runtime against PyTorch on a log scale beside its tolerance.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from exporters.fileio import atomic_write_bytes, atomic_write_text


def _fig_to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def plot_training(history: list[dict[str, Any]]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "s-", label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=0.3)
    b.plot(ep, [100 * h["train_acc"] for h in history], "o-", label="train")
    b.plot(ep, [100 * h["val_acc"] for h in history], "s-", label="validation")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy (%)"), b.legend(), b.grid(alpha=0.3)
    fig.suptitle("training")
    return _fig_to_png(fig)


def plot_parity(pairs: list[dict[str, Any]]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [p["target"] for p in pairs]
    errs = [max(p.get("max_abs") or 0.0, 1e-12) for p in pairs]
    colors = ["tab:green" if p.get("passed") else "tab:red" for p in pairs]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(pairs) + 1.2))
    ax.barh(names, errs, color=colors)
    ax.set_xscale("log")
    for i, p in enumerate(pairs):
        tol = (p.get("tolerance") or {}).get("max_abs")
        if tol:
            ax.plot([tol, tol], [i - 0.4, i + 0.4], "k--", lw=1)
    ax.set_xlabel("max |target - PyTorch| on logits (log scale; dashed: tolerance)")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    fig.suptitle("numerical parity against PyTorch")
    return _fig_to_png(fig)


def plot_accuracy_vs_size(points: list[dict[str, Any]]) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for p in points:
        ax.scatter(p["size_bytes"] / 1024, 100 * p["accuracy"], s=40)
        ax.annotate(p["name"], (p["size_bytes"] / 1024, 100 * p["accuracy"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("artifact size (KiB, log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)
    fig.suptitle("accuracy vs size")
    return _fig_to_png(fig)


def write_report(run_dir: str | Path, record: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md and report.html (plots as PNG files and inline)."""
    run_dir = Path(run_dir)
    plots: dict[str, bytes] = {}
    train = record.get("train") or {}
    if train.get("history"):
        plots["training"] = plot_training(train["history"])
    pairs = (record.get("verify") or {}).get("pairs") or []
    if pairs:
        plots["parity"] = plot_parity(pairs)
        points = [{"name": p["target"], "size_bytes": p["size_bytes"], "accuracy": p["accuracy"]}
                  for p in pairs if p.get("size_bytes") and p.get("accuracy") is not None]
        if points:
            plots["accuracy_vs_size"] = plot_accuracy_vs_size(points)
    for name, png in plots.items():
        atomic_write_bytes(run_dir / "plots" / f"{name}.png", png)
    paths = {
        "json": atomic_write_text(run_dir / "report.json", json.dumps(record, indent=2, default=str) + "\n"),
        "md": atomic_write_text(run_dir / "report.md", _markdown(record, plots)),
        "html": atomic_write_text(run_dir / "report.html", _html(record, plots)),
    }
    return paths


def _markdown(record: dict[str, Any], plots: dict[str, bytes]) -> str:
    lines = [f"# mdeploy run: {record.get('name', '')}", ""]
    train = record.get("train") or {}
    if train:
        lines += ["## Training", "",
                  f"`{train.get('model')}` on `{train.get('data')}`: best epoch {train.get('best_epoch')}, "
                  f"validation accuracy {100 * train.get('val_acc', 0):.2f}%, held-out test accuracy "
                  f"{100 * train.get('test_acc', 0):.2f}%.", ""]
    arts = (record.get("export") or {}).get("artifacts") or []
    if arts:
        lines += ["## Artifacts", "", "| artifact | file | size (KiB) | sha256 |", "|---|---|---:|---|"]
        lines += [f"| {a['format']}/{a['precision']}{'-' + a['variant'] if a.get('variant') else ''} "
                  f"| `{a['path']}` | {a['size_bytes'] / 1024:,.1f} | `{a['sha256'][:12]}` |" for a in arts]
        lines.append("")
    pairs = (record.get("verify") or {}).get("pairs") or []
    if pairs:
        lines += ["## Parity against PyTorch", "",
                  "| target | runner | max abs | mean abs | cosine | top-1 agree | accuracy | passed | first divergent |",
                  "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for p in pairs:
            fd = p.get("first_divergent")
            acc = p.get("accuracy")
            lines.append(
                f"| {p['target']} | {p.get('runner', '')} | {_num(p.get('max_abs'))} | {_num(p.get('mean_abs'))} "
                f"| {_num(p.get('cosine'), 6)} | {_pct(p.get('top1_agreement'))} | {_pct(acc)} "
                f"| {'yes' if p.get('passed') else '**NO**'} | {fd['layer'] if fd else ''} |")
        lines.append("")
    for name in plots:
        lines.append(f"![{name}](plots/{name}.png)")
    for note in record.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def _html(record: dict[str, Any], plots: dict[str, bytes]) -> str:
    md = _markdown(record, {})
    imgs = "".join(
        f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(png).decode()}"/>'
        f"<figcaption>{n.replace('_', ' ')}</figcaption></figure>" for n, png in plots.items())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>mdeploy report</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em}"
            "pre{white-space:pre-wrap;background:#f6f8fa;padding:1em}img{max-width:100%}</style></head>"
            f"<body><pre>{html.escape(md)}</pre>{imgs}</body></html>\n")


def _num(v: Any, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}g}"


def _pct(v: Any) -> str:
    return "" if v is None else f"{100 * v:.2f}%"
