"""Finding memories by their words: the query's terms, the full-text index of each database behind
one small interface, and the fusion of a word ranking with a meaning ranking.

- SQLite: the FTS5 table `memories_fts` (porter stemming, diacritics folded), kept in step with
  `memories` by triggers (migration 0005), ranked by BM25.
- PostgreSQL: the generated column `memories.text_tsv` (`to_tsvector('english', text)`) with a GIN
  index, ranked by `ts_rank_cd`.

Both are exact (every matching row of the user is ranked) and filter on `user_id`. A question's
terms are OR-ed: "where am I going this weekend" matches a memory that says "weekend" alone.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# Words that say nothing about which memory is meant (without them, "what do I like" would match
# every memory with "I" in it). Both indexes keep these words; only queries drop them.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are aren't as at be because been before being below
    between both but by can could did do does doing don't down during each few for from further had has have
    having he her here hers herself him himself his how i i'm i've if in into is it it's its itself just know
    let me more most my myself no nor not now of off on once only or other our ours ourselves out over own
    really remember same she should so some such tell than that the their theirs them themselves then there
    these they this those through to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself yourselves s t don ll re ve d m think thing things anything
    something ever still also much many get got""".split()
)
_WORD = re.compile(r"[^\W_]+")
MAX_TERMS = 16
# Which memories a search looks at: all of them, only episodes, or only facts (notes included).
Scope = Literal["all", "episodes", "facts"]
EPISODE = "episode"


def terms(query: str) -> list[str]:
    """The query's searchable words: lower case, no stopwords or single letters, first ones first."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(query.lower()):
        if len(word) > 1 and word not in STOPWORDS:
            seen.setdefault(word, None)
    return list(seen)[:MAX_TERMS]


class FullTextIndex(Protocol):
    async def search(
        self, session: AsyncSession, user_id: uuid.UUID, words: Sequence[str], k: int, *, scope: Scope = "all"
    ) -> list[uuid.UUID]:
        """The ids of the user's `k` memories in `scope` that best match any of `words`, best first."""
        ...


def scope_clause(scope: Scope, column: str = "kind") -> str:
    """SQL to AND to a memories query for `scope` (no user input in it)."""
    if scope == "episodes":
        return f" AND {column} = '{EPISODE}'"
    if scope == "facts":
        return f" AND {column} <> '{EPISODE}'"
    return ""


class SqliteFullText:
    async def search(
        self, session: AsyncSession, user_id: uuid.UUID, words: Sequence[str], k: int, *, scope: Scope = "all"
    ) -> list[uuid.UUID]:
        if not words or k <= 0:
            return []
        # Each word quoted (FTS5 syntax in a user's words is text, not operators); the user's id is
        # a column of the index too, so the match never leaves the user's own rows.
        quoted = " OR ".join('"' + word.replace('"', '""') + '"' for word in words)
        params: dict[str, object] = {"match": f'user_id : "{user_id.hex}" AND text : ({quoted})', "user_id": user_id.hex, "k": k}
        rows = await session.execute(
            text(
                "SELECT m.id FROM memories_fts JOIN memories m ON m.rowid = memories_fts.rowid "
                "WHERE memories_fts MATCH :match AND m.user_id = :user_id"
                + scope_clause(scope, "m.kind")
                + " ORDER BY bm25(memories_fts, 1.0, 0.0), m.rowid LIMIT :k"
            ),
            params,
        )
        return [uuid.UUID(hex=str(row[0])) for row in rows]


class PostgresFullText:
    async def search(
        self, session: AsyncSession, user_id: uuid.UUID, words: Sequence[str], k: int, *, scope: Scope = "all"
    ) -> list[uuid.UUID]:
        if not words or k <= 0:
            return []
        # `terms` keeps letters and digits only, so joining them with | is a well-formed tsquery.
        params: dict[str, object] = {"query": " | ".join(words), "user_id": user_id, "k": k}
        rows = await session.execute(
            text(
                "SELECT id FROM memories, to_tsquery('english'::regconfig, :query) AS q "
                "WHERE user_id = :user_id AND text_tsv @@ q"
                + scope_clause(scope)
                + " ORDER BY ts_rank_cd(text_tsv, q) DESC, id LIMIT :k"
            ),
            params,
        )
        return [row[0] for row in rows]


def full_text_for(dialect: str) -> FullTextIndex:
    return PostgresFullText() if dialect == "postgresql" else SqliteFullText()


# Reciprocal rank fusion (Cormack et al. 2009): a memory's fused score is the sum over rankings of
# weight / (K + rank). The paper's K is 60; on the evaluation's development part (docs/memory.md)
# K = 5 with the word ranking at half weight did best: names and rare words still lift a memory,
# while common words ("live", "work") no longer outvote the meaning.
RRF_K = 5
TEXT_WEIGHT = 0.5


def fuse(rankings: Iterable[Sequence[uuid.UUID]], *, k: int = RRF_K, weights: Sequence[float] | None = None) -> list[uuid.UUID]:
    """The ids of all rankings, best fused first (ties: the order in which they were first seen)."""
    scores: dict[uuid.UUID, float] = {}
    for index, ranking in enumerate(rankings):
        weight = 1.0 if weights is None else weights[index]
        for rank, memory_id in enumerate(ranking, start=1):
            scores[memory_id] = scores.get(memory_id, 0.0) + weight / (k + rank)
    return sorted(scores, key=lambda memory_id: -scores[memory_id])
