"""A conversation as a tree of messages: each message names its parent, and the conversation names
the newest message of its active path (`head_id`). Regenerated replies and edited messages are
siblings; the active path is what prompts, the buffer and the summary see.

Ids grow along every path (a message is always stored after its parent), so a path read from its
end is also in id order. These helpers run inside the caller's session.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

from sqlalchemy import ColumnElement, Select, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from companion.storage.models import Message


def path_select(
    head_id: int | ColumnElement[Any] | None,
    *,
    limit: int | None = None,
    down_to: int | ColumnElement[Any] | None = None,
) -> Select[Any]:
    """A query for the ids of the path ending at `head_id` (its newest `limit` when given), for
    use as a subquery: `Message.id.in_(path_select(head))`. `head_id` may be a scalar subquery
    (the conversation's `head_id`), which saves reading it first, and `head_id` and `down_to` may be
    bound parameters, for a statement built once (building a recursive query costs more than
    running it). With `down_to`, the walk stops at
    the first message whose id is at most `down_to` (that message included): ids grow along a path,
    so what lies beyond it is older, and a caller that only needs the newer part never reads it."""
    start = select(Message.id, Message.parent_id, literal(1).label("depth")).where(Message.id == head_id)
    path = start.cte("path", recursive=True)
    parent = aliased(Message)
    # Each step is one primary-key lookup, as a correlated scalar subquery: a join here lets the
    # planner hash the whole table at every step when its statistics make that look cheap (a new
    # or small table), which costs the table's size times the path's length.
    grandparent = select(parent.parent_id).where(parent.id == path.c.parent_id).scalar_subquery()
    step = select(path.c.parent_id, grandparent, (path.c.depth + 1).label("depth")).where(
        path.c.parent_id.is_not(None)
    )
    if limit is not None:
        step = step.where(path.c.depth < limit)
    if down_to is not None:
        step = step.where(path.c.id > down_to)
    path = path.union_all(step)
    return select(path.c.id)


async def path_ids(session: AsyncSession, head_id: int | None, *, limit: int | None = None) -> list[int]:
    """The ids of the path ending at `head_id`, oldest first (its newest `limit` when given)."""
    if head_id is None:
        return []
    ids = [int(value) for value in (await session.execute(path_select(head_id, limit=limit))).scalars()]
    ids.sort()
    return ids


async def children_of(session: AsyncSession, conversation_id: uuid.UUID) -> dict[int | None, list[int]]:
    """Every message's children, in id order (None: the roots)."""
    rows = (
        await session.execute(
            select(Message.id, Message.parent_id).where(Message.conversation_id == conversation_id).order_by(Message.id)
        )
    ).all()
    children: dict[int | None, list[int]] = defaultdict(list)
    for message_id, parent_id in rows:
        children[parent_id].append(message_id)
    return children


async def siblings_of(
    session: AsyncSession, conversation_id: uuid.UUID, parents: set[int | None]
) -> dict[int | None, list[int]]:
    """The children of just these parents (None: the roots), in id order: a page's alternatives
    without reading the whole tree."""
    wanted = [parent for parent in parents if parent is not None]
    condition: ColumnElement[bool] = Message.parent_id.in_(wanted)
    if None in parents:
        condition = or_(condition, Message.parent_id.is_(None))
    rows = (
        await session.execute(
            select(Message.id, Message.parent_id)
            .where(Message.conversation_id == conversation_id, condition)
            .order_by(Message.id)
        )
    ).all()
    children: dict[int | None, list[int]] = defaultdict(list)
    for message_id, parent_id in rows:
        children[parent_id].append(message_id)
    return children


def newest_leaf(children: dict[int | None, list[int]], message_id: int) -> int:
    """Going down from `message_id` by the newest child each time: the end of the branch that
    switching to this message shows."""
    current = message_id
    while children.get(current):
        current = children[current][-1]
    return current
