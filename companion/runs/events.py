"""The events of one reply run, as a client sees them and as every run log stores them.

A reply's events are: `message` (first: the reply's and the user message's ids), `token`s, then one
terminal `done` or `error`. Each has an SSE id that says how far into the reply it is: `0` for
`message`, the reply's length in characters (code points) after a `token`, `end` for the terminal
event. A client that resumes after an id therefore asks for the text from that offset on, whatever
stored it (this instance's memory, a Redis Stream or the database's row), and concatenating what it
had with what it gets is exactly the reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Kind = Literal["message", "token", "done", "error"]
TERMINAL = ("done", "error")
END_ID = "end"
END_OFFSET = 2**62  # the position of a client that has had the terminal event
_ID = re.compile(r"(0|[1-9][0-9]{0,17})")


@dataclass(frozen=True, slots=True)
class RunEvent:
    """`start`: the reply's length before this event. A token carries `text`; the others `data`."""

    kind: Kind
    start: int = 0
    text: str = ""
    data: dict[str, Any] | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.text)

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL

    @property
    def id(self) -> str:
        if self.terminal:
            return END_ID
        return str(self.end)

    def after(self, offset: int) -> RunEvent | None:
        """This event as seen by a client that already has `offset` characters: a token cut to
        what it lacks, or None if it has all of it. `message` (offset 0) is only sent to a client
        that has nothing (offset -1)."""
        if self.kind == "token":
            if self.end <= offset:
                return None
            if self.start >= offset:
                return self
            return RunEvent("token", offset, self.text[offset - self.start :])
        if self.kind == "message":
            return self if offset < 0 else None
        return self if offset < END_OFFSET else None

    def payload(self) -> dict[str, Any]:
        return {"text": self.text} if self.kind == "token" else dict(self.data or {})

    def encode(self) -> dict[bytes, bytes]:
        """Fields of a Redis Stream entry."""
        body = self.text.encode("utf-8") if self.kind == "token" else orjson.dumps(self.data or {})
        return {b"k": self.kind.encode(), b"s": str(self.start).encode(), b"d": body}

    @classmethod
    def decode(cls, fields: dict[bytes, bytes]) -> RunEvent:
        kind = fields[b"k"].decode()
        start = int(fields[b"s"])
        if kind == "token":
            return cls("token", start, fields[b"d"].decode("utf-8"))
        return cls(kind, start, data=orjson.loads(fields[b"d"]))  # type: ignore[arg-type]


def parse_position(value: str | None) -> int | None:
    """The offset a client has, from its Last-Event-ID (or `after`): None when the id is not one of
    ours (the caller answers 422), -1 for "nothing yet", a large number for `end`."""
    if value is None or value == "":
        return -1
    value = value.strip()
    if value == END_ID:
        return END_OFFSET
    if _ID.fullmatch(value):
        return int(value)
    return None
