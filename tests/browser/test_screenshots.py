"""Screenshots of a conversation streaming in, at laptop (1280x800) and phone (390x844) sizes.

`scripts/screenshots` runs this with COMPANION_SCREENSHOTS_DIR=docs/screenshots to refresh the
pictures in the README; otherwise they go to a temporary folder and only their taking is tested."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect

from companion.llm.scripted import ScriptedProvider, ScriptedReply
from tests.browser.conftest import PHONE, ThreadedServer, send, sign_in, start_chat

EXCHANGES = [
    (
        "Hi Elara! I just got back from a week of hiking in the Dolomites.",
        "Welcome back! A whole week in the Dolomites sounds wonderful. What is the moment you keep thinking about?",
    ),
    (
        "Watching the sunrise turn the peaks pink from the Seceda ridge. My legs still hurt, though.",
        "That alpenglow is the kind of thing people remember for years, and sore legs are a fair price "
        "for it. Did you go with friends, or was it a solo trip?",
    ),
]
STREAMING = (
    "Solo this time. I wanted some quiet to think about changing jobs.",
    "A trip with two summits, then: the mountain and the question. What did the quiet tell you, Ana? "
    "Are you leaning towards something new, or did it make you see your current job differently?",
)
PHONE_STREAMING = (
    "I think I'm ready to try something new.",
    "That takes courage. What would something new look like if nothing held you back: "
    "a different field, a different city, or working for yourself?",
)


def _stream_partly(page: Page, server: ThreadedServer, gate: asyncio.Semaphore, reply: str, tokens: int) -> None:
    for _ in range(tokens):
        server.call_soon(gate.release)
    shown = "".join(re.findall(r"\S+\s*", reply)[:tokens])  # the scripted provider's tokens
    expect(page.locator("#messages li.assistant .text").last).to_have_text(shown)


def _finish(page: Page, server: ThreadedServer, gate: asyncio.Semaphore) -> None:
    for _ in range(200):
        server.call_soon(gate.release)
    expect(page.locator("#messages li.assistant").last).to_have_attribute("data-status", "complete")


def test_screenshots_of_a_streamed_conversation(
    new_page: Callable[..., Page],
    api_key: str,
    api: httpx.Client,
    app_server: ThreadedServer,
    provider: ScriptedProvider,
    tmp_path: Path,
) -> None:
    out = Path(os.environ.get("COMPANION_SCREENSHOTS_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    api.put("/v1/preferences", json={"preferred_name": "Ana"}).raise_for_status()
    for personality, title, message in [
        ("juniper", "A short story about a lighthouse", "Help me start a story about a lighthouse keeper."),
        ("orion", "Why is the sky blue?", "Why is the sky blue?"),
    ]:
        conversation = api.post("/v1/conversations", json={"personality": personality, "title": title}).json()
        api.post(f"/v1/conversations/{conversation['id']}/messages", json={"content": message, "stream": False})

    gate, phone_gate = asyncio.Semaphore(0), asyncio.Semaphore(0)
    provider.queue(
        *(reply for _, reply in EXCHANGES),
        ScriptedReply(STREAMING[1], gate=gate),
        ScriptedReply(PHONE_STREAMING[1], gate=phone_gate),
    )

    laptop = new_page()
    sign_in(laptop, api_key)
    start_chat(laptop, "Elara")
    for message, reply in EXCHANGES:
        send(laptop, message)
        expect(laptop.locator("#messages li.assistant .text").last).to_have_text(reply)
    send(laptop, STREAMING[0])
    _stream_partly(laptop, app_server, gate, STREAMING[1], 16)
    laptop.screenshot(path=out / "chat-laptop.png", animations="disabled")
    _finish(laptop, app_server, gate)

    phone = new_page(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    sign_in(phone, api_key)
    phone.get_by_role("button", name="Open the menu").click()
    phone.locator("#conversations li").first.locator(".conversation").click()
    expect(phone.locator("#messages li")).to_have_count(6)
    send(phone, PHONE_STREAMING[0])
    _stream_partly(phone, app_server, phone_gate, PHONE_STREAMING[1], 12)
    phone.screenshot(path=out / "chat-phone.png", animations="disabled")
    _finish(phone, app_server, phone_gate)

    for name in ("chat-laptop.png", "chat-phone.png"):
        assert (out / name).stat().st_size > 10_000, name
