"""Short listings of names for messages."""

from __future__ import annotations

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
