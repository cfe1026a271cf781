"""Personalities: eight globals plus each user's own. A user's personality shadows a global one of
the same name for that user only; `resolve(user, name)` is the one call every chat request makes."""

from __future__ import annotations

import uuid

from sqlalchemy import case, delete, func, select
from sqlalchemy.exc import IntegrityError

from companion.errors import Conflict, NotFound
from companion.interchange import cards
from companion.interchange.cards import CharacterCard, ParsedCard
from companion.personalities.builtin import BUILTIN_PERSONALITIES
from companion.personalities.schemas import PersonalityCreate, PersonalityOut, PersonalityUpdate
from companion.storage.database import Database
from companion.storage.models import Personality
from companion.storage.user_lock import lock_user
from companion.types import Clock, is_valid_name, utcnow


def _out(row: Personality) -> PersonalityOut:
    return PersonalityOut(
        id=str(row.id),
        name=row.name,
        display_name=row.display_name,
        description=row.description,
        system_prompt=row.system_prompt,
        scope="global" if row.owner_id is None else "user",
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
        card=CharacterCard.model_validate(row.card) if row.card else None,
    )


def _not_found(name: str) -> NotFound:
    return NotFound(
        f"No personality named {name!r}. List the ones you can use with GET /v1/personalities.",
        code="personality_not_found",
    )


class PersonalityService:
    def __init__(self, database: Database, clock: Clock = utcnow, *, max_per_user: int = 100) -> None:
        self._db = database
        self._clock = clock
        self.max_per_user = max_per_user  # PERSONALITIES_MAX_PER_USER

    async def ensure_builtins(self) -> int:
        """Insert any missing global personality; never overwrite one an operator edited."""
        now = self._clock()
        async with self._db.session() as session:
            existing = set(
                (await session.execute(select(Personality.name).where(Personality.owner_id.is_(None)))).scalars()
            )
            missing = [p for p in BUILTIN_PERSONALITIES if p.name not in existing]
            for p in missing:
                session.add(
                    Personality(
                        id=uuid.uuid4(),
                        owner_id=None,
                        name=p.name,
                        display_name=p.display_name,
                        description=p.description,
                        system_prompt=p.system_prompt,
                        version=1,
                        created_at=now,
                        updated_at=now,
                    )
                )
        return len(missing)

    async def resolve(self, user_id: uuid.UUID, name: str) -> PersonalityOut:
        """The personality `user_id` sees under `name` (theirs first). Raises NotFound."""
        if not is_valid_name(name):
            raise _not_found(name)
        async with self._db.session() as session:
            row = (
                await session.execute(
                    select(Personality)
                    .where(
                        Personality.name == name,
                        (Personality.owner_id == user_id) | Personality.owner_id.is_(None),
                    )
                    .order_by(case((Personality.owner_id.is_(None), 1), else_=0))
                    .limit(1)
                )
            ).scalar_one_or_none()
        if row is None:
            raise _not_found(name)
        return _out(row)

    async def list_visible(self, user_id: uuid.UUID) -> list[PersonalityOut]:
        """Every personality the user can chat with, own ones replacing globals of the same name."""
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(Personality).where((Personality.owner_id == user_id) | Personality.owner_id.is_(None))
                )
            ).scalars()
            by_name: dict[str, Personality] = {}
            for row in rows:
                if row.name not in by_name or row.owner_id is not None:
                    by_name[row.name] = row
        return [_out(by_name[name]) for name in sorted(by_name)]

    async def list_global(self) -> list[PersonalityOut]:
        async with self._db.session() as session:
            rows = (
                await session.execute(
                    select(Personality).where(Personality.owner_id.is_(None)).order_by(Personality.name)
                )
            ).scalars()
            return [_out(row) for row in rows]

    async def create(self, user_id: uuid.UUID, data: PersonalityCreate) -> PersonalityOut:
        """Create the user's own personality. Raises Conflict if they already have one by that name, or
        already have PERSONALITIES_MAX_PER_USER."""
        now = self._clock()
        row = Personality(
            id=uuid.uuid4(),
            owner_id=user_id,
            name=data.name,
            display_name=data.display_name or data.name.capitalize(),
            description=data.description,
            system_prompt=data.system_prompt,
            version=1,
            created_at=now,
            updated_at=now,
        )
        try:
            async with self._db.session() as session:
                await lock_user(session, user_id)  # the count below holds until this one is in
                owned = (
                    await session.execute(select(func.count()).where(Personality.owner_id == user_id))
                ).scalar_one()
                if owned >= self.max_per_user:
                    raise Conflict(
                        f"You already have {owned} personalities (PERSONALITIES_MAX_PER_USER={self.max_per_user}); "
                        "delete one first.",
                        code="too_many_personalities",
                    )
                session.add(row)
        except IntegrityError:
            raise Conflict(
                f"You already have a personality named {data.name!r}; update it with PATCH instead.",
                code="personality_exists",
            ) from None
        return _out(row)

    async def update(self, user_id: uuid.UUID, name: str, data: PersonalityUpdate) -> PersonalityOut:
        """Change the user's own personality. Raises NotFound if they have none by that name."""
        if not is_valid_name(name):
            raise _not_found(name)
        async with self._db.session() as session:
            row = (
                await session.execute(
                    select(Personality).where(Personality.owner_id == user_id, Personality.name == name)
                )
            ).scalar_one_or_none()
            if row is None:
                raise _not_found(name)
            changes = data.model_dump(exclude_none=True)
            for field, value in changes.items():
                setattr(row, field, value)
            if changes:
                row.version += 1
                row.updated_at = self._clock()
        return _out(row)

    async def delete(self, user_id: uuid.UUID, name: str) -> None:
        """Delete the user's own personality (a global one of the same name shows through again)."""
        if not is_valid_name(name):
            raise _not_found(name)
        async with self._db.session() as session:
            result = await session.execute(
                delete(Personality).where(Personality.owner_id == user_id, Personality.name == name)
            )
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise _not_found(name)

    async def import_card(self, user_id: uuid.UUID, parsed: ParsedCard, name: str | None = None) -> PersonalityOut:
        """Create the user's own personality from a character card. Without `name`, one is made from
        the card's name (with -2, -3... if the user has it already). Raises Conflict if `name` is
        given and taken."""
        data = parsed.card.data
        candidates = [name] if name else [cards.slug(data.name)]
        if not name:
            base = candidates[0][:36]
            candidates += [f"{base}-{n}" for n in range(2, 50)]
        display = " ".join(data.name.split())[:80] or candidates[0]
        now = self._clock()
        for candidate in candidates:
            row = Personality(
                id=uuid.uuid4(),
                owner_id=user_id,
                name=candidate,
                display_name=display,
                description=cards.blurb(data),
                system_prompt=cards.system_prompt(data),
                version=1,
                created_at=now,
                updated_at=now,
                card=parsed.card.model_dump(mode="json", exclude_none=True),
                avatar=parsed.avatar,
            )
            try:
                async with self._db.session() as session:
                    session.add(row)
            except IntegrityError:
                continue
            return _out(row)
        raise Conflict(
            f"You already have a personality named {candidates[0]!r}; pick another name with ?name=.",
            code="personality_exists",
        )

    async def card_of(self, user_id: uuid.UUID, name: str) -> tuple[CharacterCard, bytes | None]:
        """The card of a personality the user sees (one made from scratch, or a global one, gets a
        card built from its fields) and its picture, if one was imported. Raises NotFound."""
        personality = await self.resolve(user_id, name)
        if personality.card is None:
            card = CharacterCard(
                spec="chara_card_v2",
                spec_version="2.0",
                data=cards.CardData(
                    name=personality.display_name,
                    description=personality.description,
                    system_prompt=personality.system_prompt,
                ),
            )
            return card, None
        avatar: bytes | None = None
        if personality.card.has_avatar and personality.scope == "user":
            async with self._db.session() as session:
                avatar = (
                    await session.execute(
                        select(Personality.avatar).where(Personality.owner_id == user_id, Personality.name == name)
                    )
                ).scalar_one_or_none()
        return personality.card, avatar
