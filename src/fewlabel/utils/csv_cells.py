"""Text cells of fewlabel's CSV files, made safe to open in a spreadsheet.

Case names and paths come from file names, DICOM tags and list files that someone else wrote.
A spreadsheet opening ``predictions.csv`` or ``metrics_per_case.csv`` runs a cell that starts
with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return as a formula (CSV injection: a
formula can fetch web pages or, in older spreadsheets, start programs). OWASP's advice is to
prefix such a cell with a single quote, which spreadsheets show as text. The prefix must come
off again when fewlabel reads its own files back (``predict --overwrite`` keeps earlier rows,
``fewlabel compare`` matches cases by name), so :func:`escape_cell` and :func:`unescape_cell`
are inverse for every string: a name that itself starts with quotes before a trigger character
gets one more quote, and reading removes exactly one. Numbers are never passed through here, so
a negative value stays a number.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from typing import Any

#: A cell a spreadsheet would evaluate, possibly behind quotes that this module added.
_FORMULA = re.compile(r"'*[=+\-@\t\r]")


def escape_cell(text: str) -> str:
    """Make a text cell display as text in a spreadsheet.

    Args:
        text: the cell's text (a case name, a path).

    Returns:
        ``text`` with a leading single quote when it starts like a formula (optionally behind
        single quotes), else ``text`` unchanged.
    """
    return "'" + text if _FORMULA.match(text) else text


def unescape_cell(text: str) -> str:
    """Undo :func:`escape_cell` on a cell read back from a fewlabel CSV file.

    Args:
        text: the cell as stored.

    Returns:
        The original text.
    """
    return text[1:] if text.startswith("'") and _FORMULA.match(text[1:]) else text


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """Rows as CSV text with ``\\n`` line ends, quoted so that every cell reads back whole.

    With ``\\n`` as the line end, Python's writer does not quote a cell holding a carriage
    return, and a reader then splits the row there (a case named after a file with a CR in its
    name lost its row). Files with such a cell are written with every cell quoted.

    Args:
        rows: the header and data rows (cells already escaped where they are text).

    Returns:
        The CSV text.
    """
    rows = [list(row) for row in rows]
    carriage = any(isinstance(cell, str) and "\r" in cell for row in rows for cell in row)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL if carriage else csv.QUOTE_MINIMAL).writerows(
        rows
    )
    return buf.getvalue()
