"""``python -m keevx_async``: the package's command line, the same as ``keevx``."""

from __future__ import annotations

from ._cli import main
from ._cli._parser import build_parser

__all__ = ["build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover - run through a subprocess
    raise SystemExit(main())
