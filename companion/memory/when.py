"""Relative dates in what the user said ("yesterday", "next weekend", "last spring", "in two weeks"),
resolved against when it was said into absolute date ranges, kept beside the memory's text.

A small resolver rather than a library: `dateparser` (the well-kept choice) pulls in regex tables for
200 languages, answers one datetime (no ranges: "next weekend" is two days, "last spring" three
months) and guesses silently where we would rather say nothing. English only; the date is taken in
UTC (the service does not know the user's time zone, so a message sent near midnight may be one day
off). Seasons are the northern hemisphere's meteorological ones (spring = March to May).
"""

from __future__ import annotations

import calendar
import json
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Protocol


class Dated(Protocol):
    """A resolved relative date: `Resolved` here, `DateOut` in the store's answers."""

    @property
    def phrase(self) -> str: ...

    @property
    def start(self) -> date: ...

    @property
    def end(self) -> date: ...


@dataclass(frozen=True)
class Resolved:
    phrase: str  # as the user wrote it, lower case: "next weekend"
    start: date
    end: date  # inclusive; equal to start for a single day


def day_label(day: date) -> str:
    return day.strftime("%a %-d %b %Y")


def describe(dated: Dated) -> str:
    """'next weekend = Sat 7 Nov - Sun 8 Nov 2026', 'last spring = March - May 2026' (for prompts)."""
    start, end = dated.start, dated.end
    if start == end:
        return f"{dated.phrase} = {day_label(start)}"
    if start.day == 1 and end == _month_end(end.year, end.month):
        first = start.strftime("%B") if start.year == end.year else start.strftime("%B %Y")
        span = first if (start.year, start.month) == (end.year, end.month) else f"{first} - {end.strftime('%B')}"
        return f"{dated.phrase} = {span} {end.year}"
    return f"{dated.phrase} = {start.strftime('%a %-d %b')} - {day_label(end)}"


_WEEKDAYS = {name.lower(): i for i, name in enumerate(calendar.day_name)}
_WEEKDAY = r"(monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
_MONTHS = {name.lower(): i for i, name in enumerate(calendar.month_name) if name}
_MONTH = "(" + "|".join(_MONTHS) + ")"
_SEASONS = {"spring": 3, "summer": 6, "fall": 9, "autumn": 9, "winter": 12}
_SEASON = r"(spring|summer|fall|autumn|winter)"
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
            "eight": 8, "nine": 9, "ten": 10, "a couple of": 2, "a few": 3, "couple of": 2, "few": 3}
_COUNT = r"(\d{1,3}|a couple of|couple of|a few|few|an|a|one|two|three|four|five|six|seven|eight|nine|ten)"
_UNIT = r"(day|week|month|year)s?"


def _month_end(year: int, month: int) -> date:
    return date(year, month, calendar.monthrange(year, month)[1])


def _add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    return date(year, month + 1, min(day.day, calendar.monthrange(year, month + 1)[1]))


def _month_range(year: int, month: int) -> tuple[date, date]:
    return date(year, month, 1), _month_end(year, month)


def _week_of(day: date) -> date:
    return day - timedelta(days=day.weekday())  # Monday


def _season_range(year: int, first_month: int) -> tuple[date, date]:
    end_index = year * 12 + first_month - 1 + 2
    return date(year, first_month, 1), _month_end(end_index // 12, end_index % 12 + 1)


def _season_containing(day: date) -> tuple[int, int]:
    """(year, first month) of the season `day` falls in (December starts winter)."""
    month = day.month
    first = {12: 12, 1: 12, 2: 12, 3: 3, 4: 3, 5: 3, 6: 6, 7: 6, 8: 6, 9: 9, 10: 9, 11: 9}[month]
    year = day.year - 1 if month in (1, 2) else day.year
    return year, first


def _relative_season(today: date, first_month: int, which: str) -> tuple[date, date]:
    current_year, current_first = _season_containing(today)
    # The season's occurrence in the current cycle: the one whose start is in the 12 months from
    # the current season's start.
    year = current_year if first_month >= current_first else current_year + 1
    start, end = _season_range(year, first_month)
    if which == "last":
        if start >= _season_range(current_year, current_first)[0]:
            start, end = _season_range(year - 1, first_month)
    elif which == "next":
        if start <= today:
            start, end = _season_range(year + 1, first_month)
    elif which == "this" and start > today and (start - today).days > 200:
        start, end = _season_range(year - 1, first_month)
    return start, end


def _weekend(day: date, offset_weeks: int) -> tuple[date, date]:
    saturday = _week_of(day) + timedelta(days=5 + 7 * offset_weeks)
    return saturday, saturday + timedelta(days=1)


def _rules() -> list[tuple[re.Pattern[str], object]]:
    def one(delta: int) -> object:
        return lambda m, d: (d + timedelta(days=delta),) * 2

    def weekend(m: re.Match[str], d: date) -> tuple[date, date]:
        which = m.group(1)
        if which == "last":
            # "last weekend" said on a Sunday is the one that ends today's week... people mean the
            # most recent one that is over: the weekend before the current week's.
            return _weekend(d, -1)
        if which == "next":
            # Said Monday to Friday, "next weekend" is ambiguous; the common reading (and the one the
            # issue's example needs) is the coming weekend. Said on a weekend, it is the following one.
            return _weekend(d, 1 if d.weekday() >= 5 else 0)
        return _weekend(d, 0)  # this weekend

    def week(m: re.Match[str], d: date) -> tuple[date, date]:
        offset = {"last": -1, "this": 0, "next": 1}[m.group(1)]
        monday = _week_of(d) + timedelta(days=7 * offset)
        return monday, monday + timedelta(days=6)

    def month(m: re.Match[str], d: date) -> tuple[date, date]:
        first = _add_months(d.replace(day=1), {"last": -1, "this": 0, "next": 1}[m.group(1)])
        return _month_range(first.year, first.month)

    def year(m: re.Match[str], d: date) -> tuple[date, date]:
        y = d.year + {"last": -1, "this": 0, "next": 1}[m.group(1)]
        return date(y, 1, 1), date(y, 12, 31)

    def weekday(m: re.Match[str], d: date) -> tuple[date, date]:
        which, target = m.group(1), _WEEKDAYS[m.group(2)]
        ahead = (target - d.weekday()) % 7
        if which == "last":
            back = (d.weekday() - target) % 7 or 7
            day = d - timedelta(days=back)
        elif which == "next":
            # "next Friday" said on a Wednesday: this coming Friday (the common reading).
            day = d + timedelta(days=ahead or 7)
        else:  # "this friday": the coming one, today included
            day = d + timedelta(days=ahead)
        return day, day

    def season(m: re.Match[str], d: date) -> tuple[date, date]:
        return _relative_season(d, _SEASONS[m.group(2)], m.group(1))

    def named_month(m: re.Match[str], d: date) -> tuple[date, date]:
        which, number = m.group(1), _MONTHS[m.group(2)]
        if which == "last":  # the most recent one that is over
            y = d.year if number < d.month else d.year - 1
        elif which == "next":  # the coming one, after this month
            y = d.year if number > d.month else d.year + 1
        else:  # "this june": this year's
            y = d.year
        return _month_range(y, number)

    def count_ago(m: re.Match[str], d: date) -> tuple[date, date]:
        return _shifted(d, -_count(m.group(1)), m.group(2))

    def count_in(m: re.Match[str], d: date) -> tuple[date, date]:
        return _shifted(d, _count(m.group(1)), m.group(2))

    return [
        (re.compile(r"\bthe day before yesterday\b"), one(-2)),
        (re.compile(r"\bthe day after tomorrow\b"), one(2)),
        (re.compile(r"\byesterday\b"), one(-1)),
        (re.compile(r"\b(?:today|tonight|this morning|this afternoon|this evening)\b"), one(0)),
        (re.compile(r"\btomorrow\b"), one(1)),
        (re.compile(r"\b(last|this|next) weekend\b"), weekend),
        (re.compile(r"\b(last|this|next) week\b"), week),
        (re.compile(r"\b(last|this|next) month\b"), month),
        (re.compile(r"\b(last|this|next) year\b"), year),
        (re.compile(rf"\b(last|this|next) {_WEEKDAY}\b"), weekday),
        (re.compile(rf"\b(last|this|next) {_SEASON}\b"), season),
        (re.compile(rf"\b(last|next|this) {_MONTH}\b"), named_month),
        (re.compile(rf"\b{_COUNT} {_UNIT} ago\b"), count_ago),
        (re.compile(rf"\bin {_COUNT} {_UNIT}\b"), count_in),
    ]


def _count(word: str) -> int:
    return int(word) if word.isdigit() else _NUMBERS[word]


def _shifted(d: date, n: int, unit: str) -> tuple[date, date]:
    if unit == "day":
        day = d + timedelta(days=n)
        return day, day
    if unit == "week":
        monday = _week_of(d + timedelta(weeks=n))
        return monday, monday + timedelta(days=6)
    if unit == "month":
        first = _add_months(d.replace(day=1), n)
        return _month_range(first.year, first.month)
    y = d.year + n
    return date(y, 1, 1), date(y, 12, 31)


_RULES = _rules()


def resolve(text: str, said_at: datetime) -> list[Resolved]:
    """The relative dates in `text`, resolved against `said_at` (its UTC date), in order of
    appearance; overlapping phrases count once (the first, longest rule wins)."""
    lowered = text.replace("\u2019", "'").lower()
    today = said_at.date()
    taken: list[tuple[int, int]] = []
    found: list[tuple[int, Resolved]] = []
    for pattern, rule in _RULES:
        for match in pattern.finditer(lowered):
            if any(match.start() < end and start < match.end() for start, end in taken):
                continue
            try:
                start, end = rule(match, today)  # type: ignore[operator]
            except (KeyError, ValueError, OverflowError):
                continue
            phrase = match.group(0)
            taken.append((match.start(), match.end()))
            found.append((match.start(), Resolved(phrase, start, end)))
    return [resolved for _, resolved in sorted(found, key=lambda item: item[0])]


def encode(found: list[Resolved]) -> str | None:
    """The form stored in `memories.dates`: a JSON list of [phrase, start, end] (ISO dates)."""
    if not found:
        return None
    return json.dumps([[r.phrase, r.start.isoformat(), r.end.isoformat()] for r in found])


def decode(stored: str | None) -> list[Resolved]:
    if not stored:
        return []
    try:
        return [Resolved(p, date.fromisoformat(s), date.fromisoformat(e)) for p, s, e in json.loads(stored)]
    except (ValueError, TypeError):
        return []
