"""Character cards through the routes, on SQLite and PostgreSQL: import (JSON and PNG) creates the
user's own personality, its greeting opens a new conversation, its lorebook and post-history
instructions shape the prompt, the creator's fields never reach the model, and the export gives
the card back. Bad cards are a 422 naming the field, and store nothing."""

from __future__ import annotations

import base64

import httpx
import orjson

from companion.interchange import cards, png
from companion.llm.scripted import ScriptedProvider
from tests.conftest import new_client
from tests.support import cards as files
from tests.support.api import all_messages, assert_error, chat, create_conversation, snapshot
from tests.support.live import LiveServer


async def _import(client: httpx.AsyncClient, raw: bytes, content_type: str, **params: str) -> httpx.Response:
    return await client.post(
        "/v1/personalities/import", content=raw, headers={"Content-Type": content_type}, params=params
    )


async def test_importing_a_png_card_creates_a_personality_whose_greeting_opens_conversations(
    client: httpx.AsyncClient,
):
    await client.put("/v1/preferences", json={"preferred_name": "Ana"})
    response = await _import(client, files.as_png(chara=files.V2), "image/png")
    assert response.status_code == 201, response.text
    created = response.json()
    assert (created["name"], created["display_name"], created["scope"]) == (
        "captain-mira-vale",
        "Captain Mira Vale",
        "user",
    )
    assert created["card"]["has_avatar"] is True
    assert created["card"]["data"]["extensions"] == files.V2["data"]["extensions"]
    assert "captain-mira-vale" in [p["name"] for p in (await client.get("/v1/personalities")).json()]

    conversation = await create_conversation(client, "captain-mira-vale")
    [greeting] = await all_messages(client, conversation["id"])
    assert greeting["role"] == "assistant"
    assert greeting["content"] == "*Captain Mira Vale looks up from the counter.* Evening, Ana. Tea or a story?"
    # The alternate greetings are there to swipe to.
    assert len(greeting["siblings"]) == 3 and greeting["siblings"][0] == greeting["id"]
    tree = (await client.get(f"/v1/conversations/{conversation['id']}/messages", params={"tree": "true"})).json()
    assert sorted(m["content"] for m in tree["data"])[0] == "*Captain Mira Vale is asleep in her chair.* Mm? Oh, Ana."


async def test_the_card_shapes_the_prompt(client: httpx.AsyncClient, provider: ScriptedProvider):
    await client.put("/v1/preferences", json={"preferred_name": "Ana"})
    assert (await _import(client, files.as_json(files.V2), "application/json")).status_code == 201
    conversation = await create_conversation(client, "captain-mira-vale")

    await chat(client, conversation["id"], "Good evening!")
    system = provider.prompts[-1][0]
    assert system.role == "system"
    assert "retired sea captain" in system.content and "calls Ana 'sailor'" in system.content
    assert "Gull Rock" not in system.content  # no lorebook key mentioned yet
    assert provider.prompts[-1][-1].role == "system"
    assert provider.prompts[-1][-1].content == "Keep Captain Mira Vale's replies under 80 words."
    assert provider.prompts[-1][1].content.startswith("*Captain Mira Vale looks up")  # the greeting is history

    await chat(client, conversation["id"], "Why is the lighthouse dark? Marguerite would not say.")
    system = provider.prompts[-1][0].content
    assert "The lighthouse on Gull Rock has been dark" in system
    assert system.index("Marguerite runs the fish market and owes Captain Mira Vale") < system.index(
        "retired sea captain"
    )  # before_char
    everything = "\n".join(m.content for prompt in provider.prompts for m in prompt)
    for secret in ("SECRET-CREATOR-NOTE", "SECRET-TAG", "SECRET-CREATOR", "{{user}}", "{{char}}", "treasure"):
        assert secret not in everything


async def test_export_gives_back_the_card_as_json_and_png(client: httpx.AsyncClient):
    source = files.v2(extensions={"chub": {"id": 7}, "x_unknown": {"deep": [1, {"a": None}]}})
    picture = png.minimal_png(5, 3, (9, 9, 9))
    created = (await _import(client, files.as_png(chara=source, picture=picture), "image/png")).json()

    as_png = await client.get(f"/v1/personalities/{created['name']}/export")
    assert as_png.status_code == 200 and as_png.headers["content-type"] == "image/png"
    texts = png.text_chunks(as_png.content)
    assert orjson.loads(base64.b64decode(texts["chara"])) == source
    assert [c for c in png.chunks(as_png.content) if c[0] != b"tEXt"] == list(png.chunks(picture))

    as_json = await client.get(f"/v1/personalities/{created['name']}/export", params={"format": "json"})
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    assert as_json.json() == source

    # The export imports again, under a new name.
    again = await _import(client, as_png.content, "image/png")
    assert again.status_code == 201 and again.json()["name"] == "captain-mira-vale-2"
    taken = await _import(client, as_json.content, "application/json", name="captain-mira-vale")
    assert_error(taken, 409, "personality_exists")


async def test_v3_json_and_v1_cards_import(client: httpx.AsyncClient):
    v3 = await _import(client, files.as_json(files.v3()), "application/json", name="cap")
    assert v3.status_code == 201 and v3.json()["card"]["spec"] == "chara_card_v3"
    assert v3.json()["display_name"] == "Captain Mira Vale"  # the nickname is for {{char}} only
    v1 = await _import(client, files.as_json(files.v1()), "application/json")
    assert v1.status_code == 201 and v1.json()["name"] == "old-tom"
    exported = (await client.get("/v1/personalities/old-tom/export")).json()
    assert exported["spec"] == "chara_card_v2" and exported["data"]["first_mes"] == "Ahoy, <USER>."
    # Both-chunk PNG through the route: ccv3 wins.
    both = files.as_png(chara=files.v2(name="Wrong One"), ccv3=files.v3(name="Right One", nickname=None))
    assert (await _import(client, both, "image/png")).json()["name"] == "right-one"


async def test_a_builtin_personality_exports_as_a_card(client: httpx.AsyncClient):
    exported = (await client.get("/v1/personalities/elara/export")).json()
    assert exported["spec"] == "chara_card_v2" and exported["data"]["name"] == "Elara"
    assert cards.parse_card(orjson.dumps(exported)).card.data.name == "Elara"


async def test_bad_cards_are_422_naming_the_field_and_store_nothing(client: httpx.AsyncClient):
    before = await snapshot(client)
    for raw, content_type, param in [
        (files.as_json(files.v2(name=5)), "application/json", "data.name"),
        (files.as_json(files.v2(alternate_greetings=[1])), "application/json", "data.alternate_greetings.0"),
        (b"{", "application/json", "file"),
        (png.minimal_png(), "image/png", "file"),
        (files.as_png(chara=files.V2)[:50], "image/png", "file"),
    ]:
        error = assert_error(await _import(client, raw, content_type), 422, "invalid_card")
        assert error["param"] == param
    assert_error(await _import(client, files.as_json(files.V2), "application/json", name="Bad Name!"), 422)
    too_big = await _import(client, b" " * (cards.MAX_CARD_BYTES + 1), "application/json")
    assert_error(too_big, 413, "body_too_large")
    assert await snapshot(client) == before


async def test_another_user_cannot_see_or_export_my_card(server: LiveServer, client: httpx.AsyncClient):
    await _import(client, files.as_json(files.V2), "application/json")
    async with await new_client(server, "mallory") as other:
        assert_error(await other.get("/v1/personalities/captain-mira-vale/export"), 404, "personality_not_found")
        assert_error(await other.post("/v1/conversations", json={"personality": "captain-mira-vale"}), 404)
