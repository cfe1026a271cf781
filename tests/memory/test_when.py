"""Relative dates resolved against when they were said: days, weekends, weeks, months, years,
weekdays, seasons and counted offsets; nothing guessed where the phrase is ambiguous."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from companion.memory import when

MONDAY = datetime(2026, 11, 2, 9, 30, tzinfo=UTC)  # Monday 2 November 2026
SATURDAY = datetime(2026, 11, 7, 22, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("said", "at", "phrase", "start", "end"),
    [
        ("I ran 10k yesterday.", MONDAY, "yesterday", date(2026, 11, 1), date(2026, 11, 1)),
        ("We're driving up the coast next weekend.", MONDAY, "next weekend", date(2026, 11, 7), date(2026, 11, 8)),
        ("We're driving up the coast next weekend.", SATURDAY, "next weekend", date(2026, 11, 14), date(2026, 11, 15)),
        ("This weekend I'm resting.", MONDAY, "this weekend", date(2026, 11, 7), date(2026, 11, 8)),
        ("Last weekend was rough.", MONDAY, "last weekend", date(2026, 10, 31), date(2026, 11, 1)),
        ("Tomorrow I see the dentist.", MONDAY, "tomorrow", date(2026, 11, 3), date(2026, 11, 3)),
        ("The day after tomorrow is my exam.", MONDAY, "the day after tomorrow", date(2026, 11, 4), date(2026, 11, 4)),
        ("Next month I start a new job.", MONDAY, "next month", date(2026, 12, 1), date(2026, 12, 31)),
        ("Next month I start a new job.", datetime(2026, 12, 20, tzinfo=UTC), "next month", date(2027, 1, 1), date(2027, 1, 31)),
        ("Last spring we went to Rome.", MONDAY, "last spring", date(2026, 3, 1), date(2026, 5, 31)),
        ("Last spring we went to Rome.", datetime(2026, 4, 10, tzinfo=UTC), "last spring", date(2025, 3, 1), date(2025, 5, 31)),
        ("This winter I'll learn to ski.", MONDAY, "this winter", date(2026, 12, 1), date(2027, 2, 28)),
        ("Next summer we move.", MONDAY, "next summer", date(2027, 6, 1), date(2027, 8, 31)),
        ("Last year I quit smoking.", MONDAY, "last year", date(2025, 1, 1), date(2025, 12, 31)),
        ("Next week is busy.", MONDAY, "next week", date(2026, 11, 9), date(2026, 11, 15)),
        ("I got the keys two weeks ago.", MONDAY, "two weeks ago", date(2026, 10, 19), date(2026, 10, 25)),
        ("I fly out in 3 days.", MONDAY, "in 3 days", date(2026, 11, 5), date(2026, 11, 5)),
        ("Last Friday I met Sam.", MONDAY, "last friday", date(2026, 10, 30), date(2026, 10, 30)),
        ("Next Friday is the party.", MONDAY, "next friday", date(2026, 11, 6), date(2026, 11, 6)),
        ("Next June we marry.", MONDAY, "next june", date(2027, 6, 1), date(2027, 6, 30)),
        ("Last June we married.", MONDAY, "last june", date(2026, 6, 1), date(2026, 6, 30)),
    ],
)
def test_a_relative_date_is_resolved_against_when_it_was_said(
    said: str, at: datetime, phrase: str, start: date, end: date
) -> None:
    assert when.resolve(said, at) == [when.Resolved(phrase, start, end)]


def test_several_dates_in_order_and_what_is_not_a_date() -> None:
    found = when.resolve("Yesterday was fine; tomorrow and next weekend are not.", MONDAY)
    assert [r.phrase for r in found] == ["yesterday", "tomorrow", "next weekend"]
    # Ambiguous without tense, or not dates at all: nothing is guessed.
    assert when.resolve("On Monday I went out. In June it rains. The weekend crowd. My Friday playlist.", MONDAY) == []


def test_stored_form_round_trips_and_reads_well() -> None:
    found = when.resolve("We're driving up the coast next weekend, back next month.", MONDAY)
    assert when.decode(when.encode(found)) == found
    assert [when.describe(r) for r in found] == [
        "next weekend = Sat 7 Nov - Sun 8 Nov 2026",
        "next month = December 2026",
    ]
    assert when.encode([]) is None and when.decode(None) == [] and when.decode("not json") == []
