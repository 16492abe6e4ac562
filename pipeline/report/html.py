"""``report.html``: the Markdown report rendered with its plots inlined, so one file can be
mailed or attached to a CI run. A tiny renderer for exactly what ``markdown.py`` writes
(headings, paragraphs, pipe tables, bullet lists, images, `code` and **bold**) rather than
a Markdown dependency."""
from __future__ import annotations

import base64
import html
import re

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
          "table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ddd;"
          "padding:3px 8px}th{background:#f6f8fa}img{max-width:100%}code{background:#f6f8fa}")


def render_html(md: str, plots: dict[str, bytes]) -> str:
    """The Markdown report as one self-contained HTML page (``plots``: name -> PNG)."""
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
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")
