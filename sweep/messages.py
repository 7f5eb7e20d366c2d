"""How messages show values and errors: short, one line, safe to print."""

from __future__ import annotations

import math
import reprlib
from typing import Any, Optional

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40


def short(value: Any, limit: int = 80) -> str:
    """A short, safe repr for messages: never raises, never spans lines."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {_digits(value)} digits"
    try:
        text = _REPR.repr(value)
    except Exception:
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _digits(value: int) -> int:
    return int(abs(value).bit_length() * math.log10(2)) + 1


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    return f"a {type(value).__name__}"


def first_line(error: BaseException, limit: Optional[int] = None) -> str:
    """The first line an error says (its type's name when it says nothing), cut to `limit` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]


def one_line(text: str) -> str:
    """Control characters and line breaks escaped: a message is always one printable line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def last_line(error: BaseException, limit: int = 500) -> str:
    """The last line of an error that is not part of a traceback: what a remote error says in the end."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "Traceback", "^")):
            return line[:limit]
    return type(error).__name__


def user_frame(error: BaseException) -> Optional[str]:
    """Where in the user's code `error` was raised: "file.py:LINE in FUNCTION" of the innermost frame
    outside torch and sweep's own modules (its examples count as the user's), or None when there is none."""
    import os
    import traceback

    import torch

    own = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))
    examples = os.path.join(own[1], "examples")
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = os.path.abspath(frame.filename)
        if path.startswith(examples) or not path.startswith(own):
            return f"{os.path.basename(path)}:{frame.lineno} in {frame.name}"
    return None
