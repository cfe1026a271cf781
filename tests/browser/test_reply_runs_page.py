"""The chat page and reply runs in real headless Chromium: a reload mid-reply picks the reply up
where it was and shows it growing again without repeating text; Stop ends a streaming reply and
keeps what it said."""

from __future__ import annotations

import asyncio

import httpx
from playwright.sync_api import Page, expect

from companion.llm.scripted import ScriptedProvider, ScriptedReply
from tests.browser.conftest import ThreadedServer, send, sign_in, start_chat, wait_ready, wait_until

TOKENS = ["Once ", "upon ", "a ", "time, ", "a ", "fox ", "met ", "a ", "crow ", "👋🏽 ", "at ", "dawn."]


def test_a_reload_mid_reply_resumes_it_without_repeating_text(
    page: Page, api_key: str, app_server: ThreadedServer, provider: ScriptedProvider, api: httpx.Client
) -> None:
    gate = asyncio.Semaphore(0)
    provider.queue(ScriptedReply("".join(TOKENS), gate=gate))
    sign_in(page, api_key)
    start_chat(page, "Elara")
    send(page, "Tell me a story")
    reply = page.locator("#messages li.assistant").last
    for _ in range(3):
        app_server.call_soon(gate.release)
    expect(reply.locator(".text")).to_have_text("".join(TOKENS[:3]))
    expect(page.locator("#stop")).to_be_visible()

    page.reload()
    wait_ready(page)
    reply = page.locator("#messages li.assistant").last
    text = reply.locator(".text")
    expect(reply).to_have_attribute("data-status", "streaming")
    expect(text).to_have_text("".join(TOKENS[:3]))  # what was generated so far, once
    for count in range(4, len(TOKENS) + 1):
        app_server.call_soon(gate.release)
        if count < len(TOKENS):
            expect(text).to_have_text("".join(TOKENS[:count]))  # growing again, token by token
    expect(reply).to_have_attribute("data-status", "complete")
    expect(text).to_have_text("".join(TOKENS))
    expect(page.locator("#stop")).to_be_hidden()

    conversation_id = api.get("/v1/conversations").json()["data"][0]["id"]
    stored = api.get(f"/v1/conversations/{conversation_id}/messages").json()["data"]
    assert [(m["content"], m["status"]) for m in stored] == [
        ("Tell me a story", "complete"),
        ("".join(TOKENS), "complete"),
    ]
    page.reload()
    wait_ready(page)
    expect(page.locator("#messages li .text")).to_have_text(["Tell me a story", "".join(TOKENS)])


def test_stop_mid_reply_keeps_what_was_said(
    page: Page, api_key: str, app_server: ThreadedServer, provider: ScriptedProvider, api: httpx.Client
) -> None:
    provider.queue(ScriptedReply("".join(TOKENS), hang_after=4))  # the model would go on forever
    sign_in(page, api_key)
    start_chat(page, "Orion")
    expect(page.locator("#stop")).to_be_hidden()
    send(page, "Tell me a long story")
    reply = page.locator("#messages li.assistant").last
    expect(reply.locator(".text")).to_have_text("".join(TOKENS[:4]))
    page.get_by_role("button", name="Stop").click()
    expect(reply).to_have_attribute("data-status", "stopped")
    expect(reply.locator(".text")).to_have_text("".join(TOKENS[:4]))
    expect(reply.locator(".status-note")).to_have_text("Stopped.")
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#send")).to_be_enabled()

    conversation_id = api.get("/v1/conversations").json()["data"][0]["id"]

    def stored() -> list[tuple[str, str]]:
        data = api.get(f"/v1/conversations/{conversation_id}/messages").json()["data"]
        return [(m["content"], m["status"]) for m in data]

    assert wait_until(lambda: stored()[-1][1] == "stopped", what="the reply to be stored stopped")
    assert stored() == [("Tell me a long story", "complete"), ("".join(TOKENS[:4]), "stopped")]

    # The conversation goes on.
    send(page, "Thanks")
    expect(page.locator("#messages li.assistant").last).to_have_attribute("data-status", "complete")
