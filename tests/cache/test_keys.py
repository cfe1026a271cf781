"""Key building: user-supplied parts can neither collide with other keys nor act as SCAN patterns,
every key stays under `companion:v1:`, and one user's keys share a cluster slot."""

from __future__ import annotations

import re
import uuid

import pytest
from redis.crc import key_slot

from companion.cache import keys

USER = uuid.UUID("0123456789abcdef0123456789abcdef")
OTHER = uuid.UUID("fedcba98-7654-4321-8fed-cba987654321")

HOSTILE = [
    "a:*",
    "*",
    "../x",
    "?",
    "[ab]",
    "a\\*",
    "{u:fedcba9876544321",
    "x" * 65,
    "x" * 10_000,
    "😀",
    "zoë",
    "",
    " ",
    "\t",
    "a b",
    "abc\n",
    "\n",
    "h.deadbeef",
    "h." + "0" * 32,
    "a.b",
    "%2A",
    "\x00",
    "\ud800",  # a lone surrogate
]
LITERAL = ["a", "ab", "abc", "x" * 64, "Alice_01", "under_score", "dash-ed", "0", "h"]
GLOB = set("*?[]\\")
SAFE_PART = re.compile(r"^[A-Za-z0-9_-]{1,64}$|^h\.[0-9a-f]{32}$")


def _personality_part(key: str) -> str:
    return key.rsplit(":personality:", 1)[1]


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_part_is_replaced_by_its_hash(value: str) -> None:
    assert re.fullmatch(r"h\.[0-9a-f]{32}", keys.part(value)), repr(value)


@pytest.mark.parametrize("value", LITERAL)
def test_a_safe_short_part_stays_readable(value: str) -> None:
    assert keys.part(value) == value


def test_a_trailing_newline_does_not_pass_as_a_safe_part() -> None:
    """`$` also matches before a final newline; the part must be hashed, not kept with it."""
    assert keys.part("abc\n") != "abc\n"
    assert "\n" not in keys.personality(USER, "abc\n")


def test_hostile_and_literal_parts_give_distinct_keys() -> None:
    names = HOSTILE + LITERAL
    built = [keys.personality(USER, name) for name in names]
    assert len(set(built)) == len(names)
    # ...also against every other kind of key, for this user and another.
    other_kinds = {
        keys.preferences(USER),
        keys.session_index(USER),
        *(keys.session(USER, name) for name in names),
        *(keys.api_key(name) for name in names),
        *(keys.personality(OTHER, name) for name in names),
    }
    assert not set(built) & other_kinds
    assert len({keys.api_key(name) for name in names}) == len(names)
    assert len({keys.session(USER, name) for name in names}) == len(names)


def test_a_hashed_part_can_never_equal_a_literal_one() -> None:
    """A literal part never contains the `.` that marks a hashed one, so no name can forge one."""
    forged = keys.part("a:*")
    assert keys.part(forged) != forged
    assert keys.personality(USER, forged) != keys.personality(USER, "a:*")


@pytest.mark.parametrize("value", HOSTILE + LITERAL)
def test_keys_built_from_user_input_carry_no_glob_metacharacters_and_stay_under_the_prefix(value: str) -> None:
    built = [
        keys.personality(USER, value),
        keys.session(USER, value),
        keys.api_key(value),
        keys.lock(keys.personality(USER, value)),
        keys.memory_search(USER, 3, None, value),
        keys.memory_search(USER, 3, OTHER, value),
    ]
    for key in built:
        assert key.startswith(keys.PREFIX + ":")
        assert not GLOB & set(key), key
        assert key.isprintable() and " " not in key, repr(key)
    assert SAFE_PART.match(_personality_part(built[0]))
    assert ":" not in keys.part(value) and "{" not in keys.part(value)


def test_every_key_kind_is_under_the_versioned_prefix() -> None:
    assert keys.PREFIX == "companion:v1"
    for key in _every_key_of(USER):
        assert key.startswith("companion:v1:"), key
    assert keys.INVALIDATION_CHANNEL == "companion:v1:invalidate"


def test_one_users_keys_share_the_users_hash_tag_and_cluster_slot() -> None:
    tag = "{u:" + USER.hex + "}"
    per_user = [
        keys.session(USER, "abc"),
        keys.token_quota(USER, "daily", "2024-05-06"),
        keys.session_index(USER),
        keys.memory_search(USER, 7, OTHER, "what do I like?"),
        keys.memory_search(USER, 0, None, "x" * 5000),
        keys.personality(USER, "a:*"),
        keys.preferences(USER),
        keys.lock(keys.personality(USER, "friendly")),
        keys.lock(keys.preferences(USER)),
    ]
    for key in per_user:
        # The first {...} of a key is its hash tag: it must be the user's.
        assert key[key.index("{") : key.index("}") + 1] == tag, key
    slots = {key_slot(key.encode()) for key in per_user}
    assert slots == {key_slot(tag[1:-1].encode())}
    assert _crc16_slot(per_user[0]) == slots.pop()  # cross-check redis-py with our own CRC16
    assert key_slot(keys.session_index(OTHER).encode()) != key_slot(keys.session_index(USER).encode())


def test_a_hostile_name_cannot_move_a_key_to_another_users_slot() -> None:
    forged = "{u:" + OTHER.hex + "}"
    key = keys.personality(USER, forged)
    assert OTHER.hex not in key
    assert key_slot(key.encode()) == key_slot(keys.preferences(USER).encode())


def test_personality_pattern_for_a_hostile_name_matches_only_its_hashed_key() -> None:
    pattern = keys.personality_pattern("a*")
    assert pattern == f"companion:v1:*:personality:{keys.part('a*')}"
    assert keys.part("a*").startswith("h.")
    assert not GLOB & set(pattern.removeprefix("companion:v1:*:personality:"))


def test_personality_pattern_without_a_name_covers_every_personality_entry() -> None:
    assert keys.personality_pattern() == "companion:v1:*:personality:*"


def test_namespace_pattern_names_one_namespace() -> None:
    assert keys.namespace_pattern("apikey") == "companion:v1:{k:*}:apikey*"
    assert keys.namespace_pattern("personality") == "companion:v1:*:personality*"
    assert keys.namespace_pattern("prefs") == "companion:v1:*:prefs*"


def test_memory_search_key_depends_on_generation_conversation_and_query() -> None:
    conversation = uuid.uuid4()
    variants = {
        keys.memory_search(USER, 0, None, "q"),
        keys.memory_search(USER, 1, None, "q"),
        keys.memory_search(USER, 0, conversation, "q"),
        keys.memory_search(USER, 0, None, "q2"),
        keys.memory_search(OTHER, 0, None, "q"),
    }
    assert len(variants) == 5
    assert keys.memory_search(USER, 0, None, "q") == keys.memory_search(USER, 0, None, "q")
    assert len(keys.memory_search(USER, 0, None, "q" * 100_000)) < 200


@pytest.mark.parametrize(
    ("key", "namespace"),
    [
        (keys.personality(USER, "friendly"), "personality"),
        (keys.personality(USER, "a:*"), "personality"),
        (keys.lock(keys.personality(USER, "friendly")), "personality"),
        (keys.preferences(USER), "prefs"),
        (keys.lock(keys.preferences(USER)), "prefs"),
        (keys.api_key("abc123"), "apikey"),
        (keys.lock(keys.api_key("abc123")), "apikey"),
        (keys.session(USER, "0123abcd"), "session"),
        (keys.session_index(USER), "sessions"),
        (keys.memory_search(USER, 2, None, "q"), "memsearch"),
        (keys.token_quota(USER, "daily", "2024-05-06"), "quota"),
        (keys.rate_limit("chat", str(USER)), "rl"),
        (keys.rate_limit("ip", "127.0.0.1"), "rl"),
        (keys.conversation_buffer(OTHER), "buffer"),
        (keys.conversation_summary(OTHER), "summary"),
        (keys.conversation_lock(OTHER), "turn"),
        ("companion:v1:", "unknown"),
    ],
)
def test_namespace_of_every_key_kind(key: str, namespace: str) -> None:
    assert keys.namespace_of(key) == namespace


def _every_key_of(user: uuid.UUID) -> list[str]:
    return [
        keys.personality(user, "friendly"),
        keys.preferences(user),
        keys.api_key("f" * 64),
        keys.session(user, "0123abcd"),
        keys.session_index(user),
        keys.memory_search(user, 0, None, "q"),
        keys.lock(keys.personality(user, "friendly")),
    ]


def _crc16_slot(key: str) -> int:
    """Redis Cluster's slot: CRC16-CCITT (XMODEM) of the hash tag (or the key) modulo 16384."""
    data = key.encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


def _every_builder() -> list[str]:
    conversation = uuid.uuid4()
    return [
        keys.personality(USER, "friendly"),
        keys.personality(USER, "a:*"),
        keys.preferences(USER),
        keys.api_key("f" * 64),
        keys.session(USER, "0123abcd"),
        keys.session_index(USER),
        keys.memory_search(USER, 0, conversation, "q"),
        keys.token_quota(USER, "daily", "20240506"),
        keys.rate_limit("chat", str(USER)),
        keys.rate_limit("ip", "::1"),
        keys.conversation_buffer(conversation),
        keys.conversation_summary(conversation),
        keys.conversation_lock(conversation),
        keys.reply_events(42),
        keys.reply_stop(42),
    ]


@pytest.mark.parametrize("key", _every_builder())
def test_every_key_carries_exactly_one_hash_tag_right_after_the_prefix(key: str) -> None:
    """Redis Cluster hashes only the first `{...}`: one tag, in a fixed place, decides the slot."""
    assert re.fullmatch(r"companion:v1:\{[a-z]:[^{}]+\}:[^{}]+", key), key


@pytest.mark.parametrize("key", _every_builder())
def test_a_keys_loader_lock_lives_on_the_keys_slot(key: str) -> None:
    """`set_if_locked` runs one Lua script over a key and its lock: they must share a slot."""
    assert key_slot(keys.lock(key).encode()) == key_slot(key.encode())


def test_a_reply_runs_keys_share_one_slot() -> None:
    """The run log pipelines XADD on the stream with EXISTS on the stop key."""
    assert key_slot(keys.reply_events(7).encode()) == key_slot(keys.reply_stop(7).encode())


def test_a_conversations_keys_share_one_slot() -> None:
    conversation = uuid.uuid4()
    slots = {
        key_slot(k.encode())
        for k in (
            keys.conversation_buffer(conversation),
            keys.conversation_summary(conversation),
            keys.conversation_lock(conversation),
        )
    }
    assert len(slots) == 1
