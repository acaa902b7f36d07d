"""What the documentation tools' command lines share: a typed qswap error (``QswapError``: bad
input, a failed command) is printed as one ``error:`` message, with exit status 2 and no traceback."""
from __future__ import annotations

import sys
from typing import Callable

from qswap.errors import QswapError


def exit_status(main: Callable[[], int]) -> int:
    """``main()``'s exit status; 2 after printing ``error: ...`` for a ``QswapError``."""
    try:
        return main()
    except QswapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
