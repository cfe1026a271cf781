"""The chat page's regenerate, swipe, edit and branches, character cards and chat files, in real
headless Chromium (issue 17's "done when"): a Tavern card PNG imported and chatted with (its
greeting opens the conversation), a reply regenerated and swiped back, a message edited and both
branches visited, a conversation exported and imported again to an identical copy, a ChatGPT
export imported, and the usage shown."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import httpx
import orjson
from playwright.sync_api import Page, expect

from companion.interchange import png
from companion.llm.scripted import ScriptedProvider
from tests.browser.conftest import send, sign_in, start_chat
from tests.support import cards as card_files
from tests.support.chatgpt import conversations_json


def _last_reply_done(page: Page) -> None:
    expect(page.locator("#messages li.assistant").last).to_have_attribute("data-status", "complete")
    expect(page.locator("#messages li.assistant .message-tools").last).to_be_visible()  # reloaded with ids


def test_a_tavern_card_png_imports_chats_and_exports(
    page: Page, api_key: str, api: httpx.Client, tmp_path: Path
) -> None:
    api.put("/v1/preferences", json={"preferred_name": "Ana"})
    card = tmp_path / "mira.png"
    card.write_bytes(card_files.as_png(chara=card_files.V2))
    sign_in(page, api_key)
    page.locator(".nav").get_by_role("button", name="Personalities").click()
    page.locator("#card-file").set_input_files(str(card))
    entry = page.locator("#personality-list li[data-name='captain-mira-vale']")
    expect(entry).to_contain_text("Captain Mira Vale")
    expect(entry).to_contain_text("SECRET-CREATOR-NOTE")  # the creator's notes are for people

    entry.get_by_role("button", name="Chat").click()
    greeting = page.locator("#messages li.assistant .text")
    expect(greeting).to_have_text(["*Captain Mira Vale looks up from the counter.* Evening, Ana. Tea or a story?"])
    page.get_by_role("button", name="Next reply").click()
    expect(greeting).to_have_text(["*Captain Mira Vale is asleep in her chair.* Mm? Oh, Ana."])
    expect(page.locator(".swipe-count")).to_have_text(["2/3"])

    send(page, "Is the lighthouse still dark?")
    _last_reply_done(page)
    expect(page.locator("#messages li .text")).to_have_count(3)
    expect(page.locator("#usage")).to_contain_text("Context")
    expect(page.locator("#usage")).to_contain_text("tokens today")

    page.locator(".nav").get_by_role("button", name="Personalities").click()
    with page.expect_download() as download:
        page.locator("#personality-list li[data-name='captain-mira-vale']").get_by_role(
            "link", name="Export card"
        ).click()
    exported = Path(download.value.path()).read_bytes()
    assert orjson.loads(base64.b64decode(png.text_chunks(exported)["chara"])) == card_files.V2


def test_regenerate_a_reply_and_swipe_back(page: Page, api_key: str, provider: ScriptedProvider) -> None:
    provider.queue("The first answer.", "The second answer.")
    sign_in(page, api_key)
    start_chat(page, "Elara")
    send(page, "Tell me something.")
    _last_reply_done(page)
    reply = page.locator("#messages li.assistant").last
    expect(reply.locator(".text")).to_have_text("The first answer.")

    reply.get_by_role("button", name="Regenerate").click()
    _last_reply_done(page)
    reply = page.locator("#messages li.assistant").last
    expect(reply.locator(".text")).to_have_text("The second answer.")
    expect(reply.locator(".swipe-count")).to_have_text("2/2")

    reply.get_by_role("button", name="Previous reply").click()
    expect(page.locator("#messages li.assistant .text")).to_have_text(["The first answer."])
    expect(page.locator("#messages li.assistant .swipe-count")).to_have_text("1/2")
    page.reload()
    expect(page.locator("#messages li .text")).to_have_text(["Tell me something.", "The first answer."])


def test_edit_a_message_and_switch_between_the_branches(page: Page, api_key: str) -> None:
    sign_in(page, api_key)
    start_chat(page, "Orion")
    send(page, "What is a star?")
    _last_reply_done(page)
    send(page, "How hot is the sun?")
    _last_reply_done(page)

    second = page.locator("#messages li.user").nth(1)
    second.get_by_role("button", name="Edit").click()
    page.get_by_label("Edit your message").fill("How big is the sun?")
    page.get_by_role("button", name="Send edit").click()
    _last_reply_done(page)
    texts = page.locator("#messages li .text")
    expect(texts).to_have_text(
        ["What is a star?", "You said: What is a star?", "How big is the sun?", "You said: How big is the sun?"]
    )
    expect(page.locator("#messages li.user").nth(1).locator(".swipe-count")).to_have_text("2/2")

    page.locator("#messages li.user").nth(1).get_by_role("button", name="Previous version").click()
    expect(texts).to_have_text(
        ["What is a star?", "You said: What is a star?", "How hot is the sun?", "You said: How hot is the sun?"]
    )
    page.locator("#messages li.user").nth(1).get_by_role("button", name="Next version").click()
    expect(texts.nth(2)).to_have_text("How big is the sun?")


def _normalized(export: dict[str, Any]) -> list[dict[str, Any]]:
    result = []
    for conversation in export["conversations"]:
        position = {m["id"]: i for i, m in enumerate(conversation["messages"])}
        result.append(
            {
                "title": conversation["title"],
                "personality": conversation["personality"],
                "times": (conversation["created_at"], conversation["updated_at"]),
                "head": position.get(conversation["head_id"]),
                "messages": [
                    (
                        position.get(m["parent_id"]),
                        m["role"],
                        m["content"],
                        m["status"],
                        m["created_at"],
                        m["prompt_tokens"],
                    )
                    for m in conversation["messages"]
                ],
            }
        )
    return result


def test_export_a_conversation_and_import_it_again_to_an_identical_copy(
    page: Page, api_key: str, api: httpx.Client
) -> None:
    sign_in(page, api_key)
    start_chat(page, "Nova")
    send(page, "Quiz me on capitals.")
    _last_reply_done(page)
    page.locator("#messages li.assistant").last.get_by_role("button", name="Regenerate").click()
    _last_reply_done(page)
    expect(page.locator("#conversation-tools")).to_be_visible()
    with page.expect_download() as download:
        page.get_by_role("link", name="Export", exact=True).click()
    exported = Path(download.value.path())
    original = orjson.loads(exported.read_bytes())
    with page.expect_download() as markdown:
        page.get_by_role("link", name="Markdown").click()
    assert "Quiz me on capitals." in Path(markdown.value.path()).read_text()

    page.locator("#chats-file").set_input_files(str(exported))
    expect(page.locator("#conversations li")).to_have_count(2)
    expect(page.locator("#messages li .text")).to_have_text(["Quiz me on capitals.", "You said: Quiz me on capitals."])
    conversations = api.get("/v1/conversations").json()["data"]
    copy_id = next(c["id"] for c in conversations if c["id"] != original["conversations"][0]["id"])
    expect(page).to_have_url(re.compile(copy_id))
    copy = api.get(f"/v1/conversations/{copy_id}/export").json()
    assert _normalized(copy) == _normalized(original)


def test_import_a_chatgpt_export(page: Page, api_key: str, tmp_path: Path) -> None:
    export = tmp_path / "conversations.json"
    export.write_bytes(orjson.dumps(conversations_json()))
    sign_in(page, api_key)
    page.locator("#chats-file").set_input_files(str(export))
    expect(page.locator("#conversations li")).to_have_count(2)
    expect(page.locator("#conversations")).to_contain_text("Autumn garden")
    page.locator("#conversations").get_by_role("button", name=re.compile("^Autumn garden")).click()
    expect(page.locator("#messages li .text")).to_have_text(
        ["What should I plant in October?", "Try garlic.", "And in pots?", "Pansies do well in pots."]
    )
    expect(page.locator("#messages li.assistant .swipe-count").first).to_have_text("2/2")
