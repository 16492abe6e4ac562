"""``report.md`` (a PR comment, and the source of ``report.html``): the run's header and
notes, with each stage's own section in between, in the order the stages ran. The
formatting helpers live here so every section writes numbers the same way."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.report.record import RunRecord


def num(v: Any, digits: int = 3) -> str:
    """A figure to ``digits`` significant digits; empty when not measured (None, NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.{digits}g}"


def pct(v: Any) -> str:
    """A fraction as a percentage; empty when not measured."""
    return "" if v is None else f"{100 * v:.2f}%"


def table(header: list[str], align: str, rows: list[list[Any]]) -> list[str]:
    """A pipe table; ``align`` has one letter per column, ``l`` or ``r``."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def render_markdown(run: "RunRecord", plots: dict[str, bytes]) -> str:
    """The whole report; ``plots`` (every section's, by name) decides which figures it shows."""
    def figure(name: str) -> list[str]:
        return [f"![{name.replace('_', ' ')}](plots/{name}.png)", ""] if name in plots else []

    lines = [f"# mdeploy run: {run.name}", ""]
    if run.stages:
        lines += ["Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in run.stages.items()) + ".", ""]
    for section in run.sections:
        lines += section.markdown(run, figure)
    if run.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in run.notes] + [""]
    return "\n".join(lines) + "\n"
