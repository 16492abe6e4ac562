"""The run report: one JSON for machines, Markdown for a PR comment, HTML with plots.

Plots are what people would rather see than read: the training curve; the parity
error of every runtime against PyTorch on a log scale beside its tolerance; the
per-layer error curve of every artifact (where the error enters and how it grows);
accuracy against size and against latency per artifact (the deployment trade-off);
the layers int8 hurts most; RepVGG vs QARepVGG under int8; where the sparse shifts
stopped moving. The HTML is self-contained (plots inline) so it can be mailed or
attached to a CI run.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from exporters.fileio import atomic_write_bytes, atomic_write_text
from models.util import pct


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


# Prefix of the quantize stage's artifacts in the run record (profiles) and the plots: its folder
# holds keys such as tflite/int8-io that the export folder has too.
QUANTIZED = "quantized "


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_tradeoff(points: list[dict[str, Any]]) -> bytes:
    """Accuracy against size and, where measured, against p50 latency, per artifact."""
    plt = _plt()
    timed = [p for p in points if p.get("latency_ms")]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 7, 4.2), squeeze=False)
    panels = [(axes[0][0], points, "size_bytes", "artifact size (KiB, log scale)", 1 / 1024)]
    if timed:
        panels.append((axes[0][1], timed, "latency_ms", "p50 latency, batch 1, local CPU (ms, log scale)", 1.0))
    cmap = plt.get_cmap("tab20")
    style = {p["name"]: (cmap(i % 20), "s" if p.get("quantized") else "o") for i, p in enumerate(points)}
    for ax, pts, key, label, scale in panels:
        for p in pts:      # a legend, not labels on the points: equal accuracies pile up
            color, marker = style[p["name"]]
            ax.scatter(p[key] * scale, 100 * p["accuracy"], s=45, marker=marker, color=color, label=p["name"],
                       alpha=0.85, edgecolors="k", linewidths=0.4)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, bbox_to_anchor=(0.5, -0.02 - 0.035 * (len(points) // 4)))
    fig.suptitle("accuracy vs size" + (" and latency" if timed else "") + " (squares: quantize stage)")
    return _fig_to_png(fig)


def plot_layer_errors(pairs: list[dict[str, Any]], cap_db: float = 140.0) -> bytes:
    """SNR of every matched layer against PyTorch, in execution order, one line per artifact.

    SNR rather than max abs: it does not depend on the scale of each layer's activations,
    so a drop shows where error enters. Layers with no error at all are drawn at ``cap_db``.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for p in pairs:
        layers = p.get("layers") or []
        if not layers:
            continue
        snr = [cap_db if (x.get("snr_db") is None or x["snr_db"] > cap_db) else x["snr_db"] for x in layers]
        ax.plot(range(len(snr)), snr, lw=1.2, label=p["target"])
        fd = p.get("first_divergent")
        if fd is not None and fd.get("index") is not None and fd["index"] < len(snr):
            ax.plot([fd["index"]], [snr[fd["index"]]], "rx", ms=9)
    ax.set_xlabel("layer (execution order, matched to PyTorch modules)")
    ax.set_ylabel(f"SNR vs PyTorch (dB; {cap_db:g} = exact)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.suptitle("per-layer error against PyTorch (red x: first divergent layer of a failing pair)")
    return _fig_to_png(fig)


def plot_sensitivity(sens: dict[str, Any], top: int = 15) -> bytes:
    """The layers whose quantization alone costs the most (lowest output SNR)."""
    plt = _plt()
    layers = sens["layers"][:top]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(layers) + 1.4))
    vals = [60.0 if x.get("snr_db") is None else x["snr_db"] for x in layers]
    ax.barh([f"{x['layer']} ({x['op_type']})" for x in layers], vals, color="tab:orange")
    whole = (sens.get("quantized") or {}).get("snr_db")
    if whole is not None:
        ax.axvline(whole, color="k", ls="--", lw=1, label=f"whole model quantized: {whole:.1f} dB")
        ax.legend(fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("output SNR with only this layer quantized (dB; lower = more sensitive)")
    ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"int8 sensitivity per layer ({sens.get('profile', '')})")
    return _fig_to_png(fig)


def plot_repvgg(rep: dict[str, Any]) -> bytes:
    plt = _plt()
    variants = [v for v in rep["variants"] if v.get("int8")]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = range(len(variants))
    f = [100 * (v["int8"].get("float_accuracy") or 0) for v in variants]
    q = [100 * (v["int8"].get("accuracy") or 0) for v in variants]
    ax.bar([x - 0.2 for x in xs], f, 0.4, label="fp32 (deploy form)")
    ax.bar([x + 0.2 for x in xs], q, 0.4, label="int8 PTQ")
    for x, v in zip(xs, variants):
        snr = v["int8"].get("snr_db")
        ax.annotate(f"{v['int8'].get('drop_points', 0):+.2f} pt drop\nSNR {snr:.1f} dB" if snr is not None else "",
                    (x + 0.2, q[x]), ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    lo = min(f + q) if variants else 0
    ax.set_ylim(max(0, lo - 5), 100.5)
    ax.set_xticks(list(xs), [v["model"] for v in variants])
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle("RepVGG vs QARepVGG: int8 post-training quantization after re-parameterization")
    return _fig_to_png(fig)


def plot_sparse_shift(sh: dict[str, Any]) -> bytes:
    """Zero-shift fraction per layer, and the joint histogram of (dy, dx) displacements."""
    plt = _plt()
    st = sh["statistics"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1.6, 1]})
    layers = st["layers"]
    a.bar(range(len(layers)), [100 * x["zero_fraction"] for x in layers], color="tab:blue")
    a.axhline(100 * st["zero_fraction"], color="k", ls="--", lw=1, label=f"all: {100 * st['zero_fraction']:.1f}%")
    a.set_xticks(range(len(layers)), [x["name"] for x in layers], rotation=60, ha="right", fontsize=7)
    a.set_ylabel("channels with zero shift (%)")
    a.set_ylim(0, 100)
    a.legend(fontsize=8)
    a.grid(alpha=0.3, axis="y")
    cells = {tuple(int(v) for v in k.split(",")): n for k, n in st["histogram"].items()}
    r = max([1] + [max(abs(dy), abs(dx)) for dy, dx in cells])
    import numpy as np
    grid = np.zeros((2 * r + 1, 2 * r + 1))
    for (dy, dx), n in cells.items():
        grid[dy + r, dx + r] = n
    im = b.imshow(grid / max(1, grid.sum()) * 100, cmap="viridis", extent=(-r - .5, r + .5, r + .5, -r - .5))
    for (dy, dx), n in cells.items():
        b.text(dx, dy, f"{100 * n / max(1, grid.sum()):.0f}", ha="center", va="center", fontsize=7, color="w")
    b.set_xlabel("dx (pixels)")
    b.set_ylabel("dy (pixels)")
    fig.colorbar(im, ax=b, label="% of channels")
    fig.suptitle(f"sparse shifts after training ({sh['model']}, L1 {sh['shift_l1']:g}): most channels do not move")
    return _fig_to_png(fig)


def _latency_by_artifact(record: dict[str, Any]) -> dict[str, float]:
    out = {}
    for p in (record.get("profile") or {}).get("profiles") or []:
        lat = p.get("latency") or {}
        if p.get("device") == "local" and lat.get("p50_ms"):
            out[p["artifact"]] = lat["p50_ms"]
    return out


def tradeoff_points(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per verified artifact: accuracy, size and local p50 latency."""
    latency = _latency_by_artifact(record)
    points = []
    for key, prefix in (("verify", ""), ("verify_quantized", QUANTIZED)):
        for p in (record.get(key) or {}).get("pairs") or []:
            if p.get("size_bytes") and p.get("accuracy") is not None:
                points.append({"name": prefix + p["target"], "size_bytes": p["size_bytes"],
                               "accuracy": p["accuracy"], "latency_ms": latency.get(prefix + p["target"]),
                               "quantized": bool(prefix)})
    return points


def write_report(run_dir: str | Path, record: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md and report.html (plots as PNG files and inline)."""
    run_dir = Path(run_dir)
    plots: dict[str, bytes] = {}
    train = record.get("train") or {}
    if train.get("history"):
        plots["training"] = plot_training(train["history"])
    pairs = [*((record.get("verify") or {}).get("pairs") or []),
             *(dict(p, target=QUANTIZED + p["target"]) for p in (record.get("verify_quantized") or {}).get("pairs") or [])]
    if pairs:
        plots["parity"] = plot_parity(pairs)
        if any(p.get("layers") for p in pairs):
            plots["per_layer_error"] = plot_layer_errors(pairs)
    points = tradeoff_points(record)
    if points:
        plots["accuracy_size_latency"] = plot_tradeoff(points)
    sens = (record.get("quantize") or {}).get("sensitivity")
    if sens and sens.get("layers"):
        plots["int8_sensitivity"] = plot_sensitivity(sens)
    if (record.get("repvgg") or {}).get("variants"):
        plots["repvgg_int8"] = plot_repvgg(record["repvgg"])
    if (record.get("sparse_shift") or {}).get("statistics"):
        plots["sparse_shifts"] = plot_sparse_shift(record["sparse_shift"])
    for name, png in plots.items():
        atomic_write_bytes(run_dir / "plots" / f"{name}.png", png)
    md = _markdown(record, plots)
    paths = {
        "json": atomic_write_text(run_dir / "report.json", json.dumps(record, indent=2, default=str) + "\n"),
        "md": atomic_write_text(run_dir / "report.md", md),
        "html": atomic_write_text(run_dir / "report.html", _html(md, plots)),
    }
    return paths


def _pairs_md(title: str, pairs: list[dict[str, Any]]) -> list[str]:
    lines = [f"## {title}", "",
             "| target | runner | max abs | mean abs | cosine | SNR dB | top-1 agree | accuracy | passed | first divergent |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for p in pairs:
        fd = p.get("first_divergent")
        lines.append(
            f"| {p['target']} | {p.get('runner', '')} | {_num(p.get('max_abs'))} | {_num(p.get('mean_abs'))} "
            f"| {_num(p.get('cosine'), 6)} | {_num(p.get('snr_db'), 3)} | {_pct(p.get('top1_agreement'))} "
            f"| {_pct(p.get('accuracy'))} | {'yes' if p.get('passed') else '**NO**'} | {fd['layer'] if fd else ''} |")
    return lines + [""]


def _markdown(record: dict[str, Any], plots: dict[str, bytes]) -> str:
    def figure(name: str) -> list[str]:
        return [f"![{name.replace('_', ' ')}](plots/{name}.png)", ""] if name in plots else []

    lines = [f"# mdeploy run: {record.get('name', '')}", ""]
    stages = record.get("stages") or {}
    if stages:
        lines += ["Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + ".", ""]
    train = record.get("train") or {}
    if train:
        lines += ["## Training", "",
                  f"`{train.get('model')}` on `{train.get('data')}`: best epoch {train.get('best_epoch')}, "
                  f"validation accuracy {100 * train.get('val_acc', 0):.2f}%, held-out test accuracy "
                  f"{100 * train.get('test_acc', 0):.2f}%.", ""] + figure("training")
    arts = (record.get("export") or {}).get("artifacts") or []
    if arts:
        lines += ["## Artifacts", "", "| artifact | file | size (KiB) | sha256 |", "|---|---|---:|---|"]
        lines += [f"| {a['format']}/{a['precision']}{'-' + a['variant'] if a.get('variant') else ''} "
                  f"| `{a['path']}` | {a['size_bytes'] / 1024:,.1f} | `{a['sha256'][:12]}` |" for a in arts]
        lines.append("")
    pairs = (record.get("verify") or {}).get("pairs") or []
    if pairs:
        lines += _pairs_md("Parity against PyTorch", pairs) + figure("parity") + figure("per_layer_error")
    q = record.get("quantize") or {}
    if q.get("variants"):
        lines += [f"## Quantization ({q.get('target')})", "",
                  f"Float (PyTorch) accuracy {_pct(q.get('float_accuracy'))} on {q.get('eval_samples')} held-out "
                  f"inputs; calibration: {(q.get('calibration') or {}).get('samples')} inputs, "
                  f"{(q.get('calibration') or {}).get('method')} ranges.", "",
                  "| artifact | accuracy | drop (points; negative = gained) | top-1 agree | SNR dB | size (KiB) | smaller |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for v in q["variants"]:
            snr = ", ".join(_num(x, 3) for x in (v.get("snr_db") or {}).values())
            lines.append(f"| {v['key']} | {_pct(v.get('accuracy'))} | {_num(v.get('drop_points'), 3)} "
                         f"| {_pct(v.get('top1_agreement'))} | {snr} | {v['size_bytes'] / 1024:,.1f} "
                         f"| {_num(v.get('size_ratio'), 3)}x |")
        refs = q.get("references") or []
        if refs:
            lines += ["", "Reference points (MobileNetV2, ImageNet top-1): " + "; ".join(
                f"{r['short']}: {r['float_accuracy']:.2f}% -> {r['quantized_accuracy']:.2f}% "
                f"({r['drop']:.2f} points)" for r in refs) + "."]
        lines.append("")
        lines += figure("int8_sensitivity")
        qpairs = (record.get("verify_quantized") or {}).get("pairs") or []
        if qpairs:
            lines += _pairs_md("Parity of the quantized artifacts against PyTorch", qpairs)
    profiles = (record.get("profile") or {}).get("profiles") or []
    if profiles:
        lines += ["## Latency", "", "| artifact | device | runtime | p50 ms | p90 ms | first ms | init ms | size (KiB) |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for p in profiles:
            lat = p.get("latency") or {}
            lines.append(f"| {p['artifact']} | {p['device']} | {p['runtime']} | {_num(lat.get('p50_ms'))} "
                         f"| {_num(lat.get('p90_ms'))} | {_num(p.get('first_inference_ms'))} "
                         f"| {_num(p.get('init_ms'))} | {(p.get('artifact_size_bytes') or 0) / 1024:,.1f} |")
        lines.append("")
    lines += figure("accuracy_size_latency")
    rep = record.get("repvgg") or {}
    if rep.get("variants"):
        lines += ["## RepVGG re-parameterization", "",
                  "| model | params train -> deploy | convs / blocks | Adds | reparam max abs | fp32 acc | int8 acc "
                  "| drop (points; negative = gained) | int8 SNR dB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v in rep["variants"]:
            i8 = v.get("int8") or {}
            lines.append(f"| {v['model']} | {v['params_train']:,} -> {v['params_deploy']:,} | {v['convs']} / {v['blocks']} "
                         f"| {v['adds']} | {_num(v.get('reparam_max_abs'))} | {_pct(i8.get('float_accuracy'))} "
                         f"| {_pct(i8.get('accuracy'))} | {_num(i8.get('drop_points'), 3)} | {_num(i8.get('snr_db'), 3)} |")
        lines.append("")
        lines += figure("repvgg_int8")
    sh = record.get("sparse_shift") or {}
    if sh.get("statistics"):
        st = sh["statistics"]
        lines += ["## Sparse shifts", "",
                  f"`{sh['model']}` trained with L1 {sh['shift_l1']:g}: held-out accuracy "
                  f"{_pct((sh.get('train') or {}).get('test_acc'))}; {st['zero']} of {st['channels']} channels "
                  f"({_pct(st['zero_fraction'])}) do not move. Exported shifts are data movement only: "
                  f"{'yes' if sh.get('data_movement_only') else '**NO**'}; shift outputs exact against PyTorch: "
                  f"{'yes' if sh.get('shift_parts_exact') else '**NO**'}.", ""]
        lines += figure("sparse_shifts")
    notes = record.get("notes", [])
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines) + "\n"


def _html(md: str, plots: dict[str, bytes]) -> str:
    """The Markdown report as HTML, the plots inlined (a tiny renderer for what _markdown writes:
    headings, paragraphs, pipe tables, bullet lists, images, `code` and **bold**)."""
    body: list[str] = []
    table: list[str] = []
    items: list[str] = []

    def inline(text: str) -> str:
        t = html.escape(text)
        t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)

    def flush() -> None:
        if table:
            rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table]
            align = ["right" if c.endswith(":") else "left" for c in rows[1]] if len(rows) > 1 else []
            out = ["<table><thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in rows[0]) + "</tr></thead><tbody>"]
            for r in rows[2:]:
                out.append("<tr>" + "".join(f'<td style="text-align:{a}">{inline(c)}</td>'
                                            for c, a in zip(r, align or ["left"] * len(r))) + "</tr>")
            body.append("".join(out) + "</tbody></table>")
            table.clear()
        if items:
            body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md.splitlines():
        image = re.fullmatch(r"!\[([^]]*)\]\(plots/([\w-]+)\.png\)", line.strip())
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if image and image.group(2) in plots:
            png = base64.b64encode(plots[image.group(2)]).decode()
            body.append(f'<figure><img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{png}"/>'
                        f"<figcaption>{html.escape(image.group(1))}</figcaption></figure>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    return ("<!doctype html><html><head><meta charset='utf-8'><title>mdeploy report</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ddd;"
            "padding:3px 8px}th{background:#f6f8fa}img{max-width:100%}code{background:#f6f8fa}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}g}"


_pct = pct
