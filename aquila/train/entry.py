"""Entry-point wrapper: one `error: ...` line (from rank 0 only under torchrun) and exit status 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from aquila.errors import AquilaError


def guarded(fn: Callable[[], int]) -> int:
    """Run `fn`; an AquilaError becomes one line on stderr (rank 0 only, so N processes do not repeat it) and 2."""
    try:
        return int(fn() or 0)
    except AquilaError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
