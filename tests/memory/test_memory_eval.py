"""The memory evaluation's frozen data and its runner: at least 300 questions, development and test
parts on different people, every evidence message present; the runner's figures on a small slice."""

from __future__ import annotations

import copy

import pytest

from bench import memory_eval
from companion.services import Services


def test_the_frozen_data_is_what_was_written_and_holds_together() -> None:
    data = memory_eval.load()  # exits if the file's hash is not the frozen one
    people = data["people"]
    assert sum(len(p["questions"]) for p in people) >= 300
    assert {p["split"] for p in people} == {"dev", "test"}
    dev = {p["person"] for p in people if p["split"] == "dev"}
    test = {p["person"] for p in people if p["split"] == "test"}
    assert dev and test and not dev & test
    assert sum(len(p["questions"]) for p in people if p["split"] == "test") >= 250
    for person in people:
        said = {m["id"]: m for s in person["sessions"] for m in s["messages"]}
        assert len({s["date"] for s in person["sessions"]}) == len(person["sessions"])  # sessions on different days
        for question in person["questions"]:
            assert question["evidence"] and all(e in said and not said[e]["chitchat"] for e in question["evidence"])
    assert len(data["disclosures"]) >= 70


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_runner_scores_a_small_slice(services: Services) -> None:
    data = copy.deepcopy(memory_eval.load())
    person = data["people"][0]
    first = person["sessions"][0]
    person["sessions"] = [first]
    ids = {m["id"] for m in first["messages"]}
    person["questions"] = [q for q in person["questions"] if set(q["evidence"]) <= ids]
    data["people"] = [person]
    data["disclosures"] = data["disclosures"][:5]
    figures = await memory_eval.evaluate(services, data, split=person["split"])
    assert figures.questions == len(person["questions"]) > 0
    assert 0.5 <= figures.recall[10] <= 1.0 and figures.recall[3] <= figures.recall[5] <= figures.recall[10]
    assert figures.chitchat > 0 and figures.false_memory_rate <= 0.1
    assert figures.episodes > 0 and figures.bytes_per_memory > 0
    assert any(line.startswith("evidence recall @3") for line in figures.lines())
