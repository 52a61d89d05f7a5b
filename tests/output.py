"""What a failed subprocess printed, shortened for an assertion message."""

from __future__ import annotations

import re

_JVM_FRAME = re.compile(r"^\s+(at |\.\.\. \d+ more)")


def tail(text: str, chars: int = 3000) -> str:
    """The last ``chars`` of ``text`` without the JVM's stack frames: a Python driver's
    error sits above the JVM's shutdown traces, which would otherwise fill the tail."""
    kept = [line for line in text.splitlines() if not _JVM_FRAME.match(line)]
    return "\n".join(kept)[-chars:]
