"""The report's plots: what people would rather see than read. Each takes the plain-data
(``to_dict()``) form of a stage's result and returns a PNG, so a plot can be redrawn from a
saved ``report.json`` and tested without running the stage.

The training curve; the parity error of every runtime against PyTorch on a log scale
beside its tolerance; the per-layer error curve of every artifact (where the error enters
and how it grows); accuracy against size and against latency per artifact (the deployment
trade-off); the layers int8 hurts most; RepVGG vs QARepVGG under int8; where the sparse
shifts stopped moving.
"""
from __future__ import annotations

import io
from typing import Any


def _plt() -> Any:
    """pyplot without a display: reports are written on CI machines and servers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _fig_to_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def plot_training(history: list[dict[str, Any]]) -> bytes:
    plt = _plt()
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
    plt = _plt()
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
    """The layers whose quantization alone costs the most (lowest output SNR): the layer
    quantized whole when the ranking ran, else its weights alone and its activations alone
    (two bars; a layer without weights has only the second)."""
    plt = _plt()
    layers = sens["layers"][:top]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(layers) + 1.4))
    names = [f"{x['layer']} ({x['op_type']})" for x in layers]

    def db(v: float | None) -> float:
        return 60.0 if v is None else v                 # "identical to float" drawn past any real figure
    split = sens.get("mode") == "split"                 # no whole-layer ranking: the split probes' two figures
    if split:
        pos = range(len(layers))
        ax.barh([p - 0.2 for p in pos], [db(x["weight_only_snr_db"]) if x.get("has_weights") else 0.0 for x in layers],
                height=0.4, color="tab:blue", label="weights only")
        ax.barh([p + 0.2 for p in pos], [db(x["activation_only_snr_db"]) for x in layers], height=0.4, color="tab:orange",
                label="activations only")
        ax.set_yticks(pos, names)
    else:
        ax.barh(names, [db(x.get("snr_db")) for x in layers], color="tab:orange")
    whole = (sens.get("quantized") or {}).get("snr_db")
    if whole is not None:
        ax.axvline(whole, color="k", ls="--", lw=1, label=f"whole model quantized: {whole:.1f} dB")
    if whole is not None or split:
        ax.legend(fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(("output SNR with only this layer's weights / activations quantized" if split
                   else "output SNR with only this layer quantized") + " (dB; lower = more sensitive)")
    ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"int8 sensitivity per layer ({sens.get('profile', '')})")
    return _fig_to_png(fig)


def plot_mixed_precision(mixed: dict[str, Any]) -> bytes:
    """Model size against logit SQNR along the ``--target-sqnr`` search: every measured step
    (16-bit activations, 16-bit weights, then float), the target, and the configuration chosen."""
    plt = _plt()
    path = mixed["path"]
    target = mixed["target_sqnr_db"]
    top = max([p["sqnr_db"] for p in path if p["sqnr_db"] is not None] or [target])
    show_target = target <= top + 15          # a far-off target (e.g. 200 dB) is named, not drawn
    cap = max(top, target if show_target else top) + 10     # where "identical to float" is drawn
    fig, ax = plt.subplots(figsize=(8, 4.2))
    key = "weight_bytes" if all(p.get("weight_bytes") for p in path) else "size_bytes"
    xs = [p[key] / 1024 for p in path]
    ys = [cap if p["sqnr_db"] is None else p["sqnr_db"] for p in path]
    ax.plot(xs, ys, "-", color="0.6", lw=1, zorder=1, label="search path")
    front = sorted(zip(xs, ys))
    pareto = [pt for i, pt in enumerate(front) if all(q[1] < pt[1] for q in front[:i])]
    if len(pareto) > 1:
        ax.step(*zip(*pareto), where="post", color="tab:red", ls=":", lw=1.2, zorder=1, label="Pareto front")
    style = {"start": ("tab:blue", "o", f"{mixed.get('profile', 'w8a8')} (start)"),
             "w16": ("tab:orange", "s", "+ 16-bit activations"),
             "w16w": ("tab:purple", "^", "+ 16-bit weights"), "float": ("tab:green", "D", "+ float")}
    for action, (color, marker, label) in style.items():
        pts = [(x, y) for x, y, p in zip(xs, ys, path) if p["action"] == action]
        if pts:
            ax.scatter(*zip(*pts), color=color, marker=marker, s=40, label=label, zorder=2, edgecolors="k",
                       linewidths=0.4)
    chosen = mixed.get("chosen_step", 0)
    if 0 <= chosen < len(path):
        ax.scatter([xs[chosen]], [ys[chosen]], s=180, facecolors="none", edgecolors="r", linewidths=1.5,
                   label="chosen", zorder=3)
    if show_target:
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g} dB")
    ax.set_xlabel("weights and quantization parameters (KiB)" if key == "weight_bytes" else "QDQ model size (KiB)")
    ax.set_ylabel("logit SQNR vs float (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"mixed precision: size vs logit SQNR along the search ({mixed.get('profile', '')}; target "
                 f"{target:g} dB {'reached' if mixed.get('reached') else 'not reached'})")
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


__all__ = ["plot_layer_errors", "plot_mixed_precision", "plot_parity", "plot_repvgg", "plot_sensitivity",
           "plot_sparse_shift", "plot_tradeoff", "plot_training"]
