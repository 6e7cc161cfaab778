"""The report's two pages from one outline: ``summary.md`` and a self-contained ``report.html``.

The report is built once as a list of blocks (headings, paragraphs, lists, tables, figures) and
rendered twice: Markdown that links the PNGs beside it (it reads on GitHub and in any editor),
and HTML with every figure inline as a base64 ``data:`` URI and its style in the page, so the
one file opens anywhere, offline, with no request leaving the machine.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1em; }
"""


@dataclass
class Page:
    """The outline: blocks in order, each ``(kind, payload)``.

    Kinds: ``h1``/``h2``/``h3`` (text), ``p`` and ``note`` (text), ``list`` (items),
    ``table`` ((headers, rows)), ``figure`` ((file under the report dir, caption)).
    """

    blocks: list[tuple[str, object]] = field(default_factory=list)

    def add(self, kind: str, payload: object) -> None:
        """Append a block."""
        self.blocks.append((kind, payload))


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(page: Page) -> str:
    """The page as Markdown; figures link their PNGs by relative path.

    Args:
        page: the outline.
    """
    out: list[str] = []
    for kind, payload in page.blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {payload}\n")
        elif kind == "p":
            out.append(f"{payload}\n")
        elif kind == "note":
            out.append(f"> {payload}\n")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in payload) + "\n")
        elif kind == "table":
            headers, rows = payload
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "figure":
            file, caption = payload
            out.append(f"![{Path(file).stem}]({file})\n\n*{caption}*\n")
    return "\n".join(out)


def _numeric(value: object) -> bool:
    text = str(value).replace("−", "-").lstrip("+-")
    return text.replace(".", "", 1).replace("%", "").isdigit()


def html_page(page: Page, root: Path, title: str) -> str:
    """The page as one HTML file: style inline, figures as base64 PNG data URIs.

    Args:
        page: the outline.
        root: the report dir the figure files are read from.
        title: the document title.
    """
    esc = html.escape
    body: list[str] = []
    for kind, payload in page.blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{esc(str(payload))}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{esc(str(payload))}</p>")
        elif kind == "note":
            body.append(f'<p class="note">{esc(str(payload))}</p>')
        elif kind == "list":
            items = "".join(f"<li>{esc(str(item))}</li>" for item in payload)
            body.append(f"<ul>{items}</ul>")
        elif kind == "table":
            headers, rows = payload
            head = "".join(f"<th>{esc(str(h))}</th>" for h in headers)
            lines = ["<tr>" + "".join(
                f'<td class="num">{esc(str(c))}</td>' if _numeric(c) else f"<td>{esc(str(c))}</td>"
                for c in row) + "</tr>" for row in rows]
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}"
                        "</tbody></table>")
        elif kind == "figure":
            file, caption = payload
            data = base64.b64encode((root / file).read_bytes()).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption)}">'
                        f"<figcaption>{esc(caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
