"""Type aliases and small value types shared across domains."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, StringConstraints

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
# Tab, newline and carriage return are text; every other control or format-breaking code point is not.
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def check_text(value: str, *, multiline: bool = True) -> str:
    """Reject text that would corrupt storage or prompts: lone surrogates, NUL and other controls."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid UTF-8 (it contains a lone surrogate)") from None
    for char in value:
        if unicodedata.category(char) == "Cc" and not (multiline and char in _ALLOWED_CONTROLS):
            raise ValueError(f"text must not contain control characters (found U+{ord(char):04X})")
    return value


def _multiline(value: str) -> str:
    return check_text(value, multiline=True)


def _single_line(value: str) -> str:
    return check_text(value, multiline=False)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


def is_valid_name(value: str) -> bool:
    # fullmatch: `$` would also match before a trailing newline, letting "elara\n" through.
    return bool(_NAME_RE.fullmatch(value))


def _name(value: str) -> str:
    if not is_valid_name(value):
        raise ValueError("must be 1-40 characters of a-z, 0-9, '-' or '_', starting with a letter or digit")
    return value


PersonalityName = Annotated[str, AfterValidator(_name)]
Line = Annotated[str, AfterValidator(_single_line)]
Text = Annotated[str, AfterValidator(_multiline)]
NonBlankLine = Annotated[str, StringConstraints(min_length=1), AfterValidator(_single_line), AfterValidator(_not_blank)]
NonBlankText = Annotated[str, StringConstraints(min_length=1), AfterValidator(_multiline), AfterValidator(_not_blank)]
