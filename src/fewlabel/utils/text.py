"""Short listings of names for messages, and padding that keeps terminal tables aligned."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence


def short_list(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are.

    Error messages and warnings name examples, not hundreds of cases.

    Args:
        names: the names, in the order to show.
        limit: how many to show.

    Returns:
        ``"a, b, c, d, e and 7 more"``, or all of them when they are ``limit`` or fewer.
    """
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def display_width(text: str) -> int:
    """The columns ``text`` takes in a terminal.

    ``len`` counts characters; a terminal gives East Asian wide characters (class names such
    as 磨玻璃影) two columns and combining accents none.

    Args:
        text: the text.

    Returns:
        Its width in columns.
    """
    return sum(
        0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
        for ch in text
    )


def pad(text: str, width: int) -> str:
    """``text`` followed by spaces up to ``width`` terminal columns (``str.ljust`` by display width).

    Args:
        text: the text.
        width: the column width to fill.

    Returns:
        The padded text (unchanged when it is already as wide).
    """
    return text + " " * max(0, width - display_width(text))
