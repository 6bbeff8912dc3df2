"""Self-contained HTML reports: plain HTML and inline CSS, images embedded as base64.

One file opens anywhere (a browser, an e-mail attachment, an archive) without the PNGs
next to it and without JavaScript. Every piece of user text is escaped.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fewlabel.utils.files import atomic_write_text

__all__ = ["fmt", "image", "key_value_table", "notes_list", "render_page", "table", "write_page"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #3a6ea5; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; color: #3a6ea5; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: right; }
th { background: #eef3f9; }
td:first-child, th:first-child { text-align: left; }
.muted { color: #777; font-size: .9em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; margin: .4em 0; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; }
"""


def fmt(value: Any, digits: int = 3) -> str:
    """Format a cell: floats to ``digits`` decimals, ``None``/NaN as ``n/a``.

    Args:
        value: anything printable.
        digits: decimals for floats.

    Returns:
        Escaped text.
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def table(rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None, digits: int = 3) -> str:
    """Render rows as an HTML table.

    Args:
        rows: cell values, formatted with :func:`fmt`.
        header: column titles.
        digits: decimals for floats.

    Returns:
        The ``<table>`` element.
    """
    parts = ["<table>"]
    if header:
        parts.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{fmt(c, digits)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def key_value_table(mapping: Mapping[str, Any], digits: int = 3) -> str:
    """Render a flat mapping as a two-column table.

    Args:
        mapping: names to values.
        digits: decimals for floats.

    Returns:
        The ``<table>`` element.
    """
    return table(([k, v] for k, v in mapping.items()), digits=digits)


def notes_list(notes: Iterable[str]) -> str:
    """Render warnings/caveats as highlighted paragraphs.

    Args:
        notes: plain-text notes.

    Returns:
        HTML (empty when there are no notes).
    """
    return "\n".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)


def image(path: str | Path, caption: str | None = None, width: int | None = None) -> str:
    """Embed a PNG as a base64 data URI inside a ``<figure>``.

    Args:
        path: the PNG file.
        caption: optional caption.
        width: optional display width in pixels.

    Returns:
        The ``<figure>`` element, or a note if the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        return f'<p class="note">figure {html.escape(path.name)} was not produced</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    style = f' style="width:{int(width)}px"' if width else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}"{style}>{cap}</figure>'


def render_page(title: str, sections: Sequence[tuple[str, str]], subtitle: str | None = None) -> str:
    """Assemble a complete HTML page.

    Args:
        title: page title and top heading.
        sections: ``(heading, html_body)`` pairs; bodies are trusted HTML built with this module.
        subtitle: optional line under the title.

    Returns:
        The HTML document.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f'<p class="muted">{html.escape(subtitle)}</p>')
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{body}")
    parts.append(f'<p class="muted">Generated by fewlabel on {stamp}.</p></body></html>')
    return "\n".join(parts)


def write_page(
    path: str | Path, title: str, sections: Sequence[tuple[str, str]], subtitle: str | None = None
) -> Path:
    """Render and atomically write an HTML report.

    Args:
        path: destination ``.html``.
        title: page title.
        sections: ``(heading, html_body)`` pairs.
        subtitle: optional line under the title.

    Returns:
        The destination path.
    """
    return atomic_write_text(path, render_page(title, sections, subtitle))
