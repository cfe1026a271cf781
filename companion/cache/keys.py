"""Every Redis key and channel companion uses, built here and nowhere else.

Keys live under a versioned namespace (`companion:v1:`). User-supplied parts pass through `part()`:
safe short tokens stay readable, anything else (`a:*`, `../x`, emoji, very long names) becomes
`h.<sha256 prefix>`, so no input can collide with another key or act as a SCAN pattern (a literal
part can never contain the `.` that marks a hashed one).

Hash tags (Redis Cluster): every key is `companion:v1:{<tag>}:<rest>`, and only the `{...}` part
decides the key's slot. A multi-key command or Lua script may only touch keys of one slot, so keys
used together share a tag:

    {u:<user id>}          a user's cached personality/preferences, sessions, quotas, memory searches
    {c:<conversation id>}  a conversation's buffer, summary and turn lease
    {r:<subject>}          one rate-limit subject (a user id or a client IP)
    {k:<api key hash>}     one API key's owner
    <key>:lock             a loader lock: the key's own tag, so the same slot (`lock()`)

A new key (a reply stream, a run's state, ...) picks the tag of what it is used with, e.g.
`f"{PREFIX}:{conversation_tag(conversation_id)}:stream"`, so a script over it and the conversation's
other keys stays on one slot; tests/cache/test_keys.py checks every builder has exactly one tag.
Keys used in no multi-key operation should still be tagged by their owner, which spreads load over
the cluster evenly and keeps a user's keys together.
"""

from __future__ import annotations

import hashlib
import re
import uuid

PREFIX = "companion:v1"
INVALIDATION_CHANNEL = f"{PREFIX}:invalidate"
_SAFE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # whole value: fullmatch, since `$` also matches before "\n"


def part(value: str) -> str:
    if _SAFE.fullmatch(value):
        return value
    return "h." + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def user_tag(user_id: uuid.UUID) -> str:
    return f"{{u:{user_id.hex}}}"


def personality(user_id: uuid.UUID, name: str) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:personality:{part(name)}"


def personality_pattern(name: str | None = None) -> str:
    """SCAN pattern for one personality name across all users, or every personality entry."""
    return f"{PREFIX}:*:personality:{part(name) if name else '*'}"


def preferences(user_id: uuid.UUID) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:prefs"


def api_key(key_hash: str) -> str:
    # Tagged by the key itself: its loader lock (`lock()`) must share its slot.
    return f"{PREFIX}:{{k:{part(key_hash)}}}:apikey"


def session(user_id: uuid.UUID, session_id: str) -> str:
    return session_prefix(user_id) + part(session_id)


def session_prefix(user_id: uuid.UUID) -> str:
    """What every session key of the user starts with (the cap's script builds them from the index)."""
    return f"{PREFIX}:{user_tag(user_id)}:session:"


def session_index(user_id: uuid.UUID) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:sessions"


def memory_search(user_id: uuid.UUID, generation: int, conversation_id: uuid.UUID | None, query: str) -> str:
    conversation = conversation_id.hex if conversation_id else "-"
    query_hash = hashlib.sha256(query.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{PREFIX}:{user_tag(user_id)}:memsearch:{generation}:{conversation}:{query_hash}"


def namespace_pattern(namespace: str) -> str:
    """SCAN pattern for every key of one namespace."""
    if namespace == "apikey":
        return f"{PREFIX}:{{k:*}}:apikey*"
    return f"{PREFIX}:*:{namespace}*"


def rate_limit(policy: str, subject: str) -> str:
    """A GCRA key. `subject` is a user id or a client IP; tagged by subject so a user's keys share a slot."""
    return f"{PREFIX}:{{r:{part(subject)}}}:rl:{part(policy)}"


def token_quota(user_id: uuid.UUID, window: str, label: str) -> str:
    return f"{PREFIX}:{user_tag(user_id)}:quota:{part(window)}:{part(label)}"


def conversation_tag(conversation_id: uuid.UUID) -> str:
    return f"{{c:{conversation_id.hex}}}"


def conversation_buffer(conversation_id: uuid.UUID) -> str:
    return f"{PREFIX}:{conversation_tag(conversation_id)}:buffer"


def conversation_summary(conversation_id: uuid.UUID) -> str:
    return f"{PREFIX}:{conversation_tag(conversation_id)}:summary"


def conversation_lock(conversation_id: uuid.UUID) -> str:
    return f"{PREFIX}:{conversation_tag(conversation_id)}:turn"


def reply_tag(message_id: int) -> str:
    """One reply run's keys share this hash tag, so one cluster slot."""
    return f"{{m:{int(message_id)}}}"


def reply_events(message_id: int) -> str:
    """The Redis Stream of a reply's events (companion.runs.redis)."""
    return f"{PREFIX}:{reply_tag(message_id)}:events"


def reply_stop(message_id: int) -> str:
    """Present while a stop of the reply has been asked for."""
    return f"{PREFIX}:{reply_tag(message_id)}:stop"


def lock(key: str) -> str:
    """The loader lock for `key`; same hash tag, so the same slot."""
    return f"{key}:lock"


def namespace_of(key: str) -> str:
    """`personality`, `prefs`, ... for metrics and logs."""
    rest = key[len(PREFIX) + 1 :]
    if rest.startswith("{"):
        rest = rest[rest.find("}") + 2 :]
    return rest.split(":", 1)[0] or "unknown"
