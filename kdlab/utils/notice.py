"""``notice(message)``: one ``kdlab: note: ...`` line on stderr, for what a user should know that is not an error."""

from __future__ import annotations

import sys


def notice(message: str) -> None:
    """Print ``kdlab: note: message`` to stderr (every process prints its own; call it on rank 0 only)."""
    print(f"kdlab: note: {message}", file=sys.stderr, flush=True)
