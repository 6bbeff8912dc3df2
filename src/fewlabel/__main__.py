"""Allow ``python -m fewlabel``."""

from __future__ import annotations

from fewlabel.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
