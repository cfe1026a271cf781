"""The chat page in real headless Chromium: sign in, a reply that streams token by token, history
after a reload, personalities, preferences, memories, errors, sign-out, and the drawer on a
phone-sized window."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable

import httpx
from playwright.sync_api import Page, Route, expect

from companion.llm.scripted import ScriptedProvider, ScriptedReply
from tests.browser.conftest import (
    PHONE,
    ThreadedServer,
    send,
    sign_in,
    start_chat,
    wait_ready,
    wait_until,
)

REPLY_TOKENS = ["Lovely ", "to ", "meet ", "you, ", "Ana. ", "What ", "brings ", "you ", "here?"]


def test_sign_in_with_a_wrong_key_shows_the_error_then_the_right_key_gets_in(page: Page, api_key: str) -> None:
    page.goto("/")
    expect(page.get_by_label("API key")).to_be_visible()
    page.get_by_label("API key").fill("ck_not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_be_visible()
    expect(page.locator("#signin-error")).not_to_have_text("")
    expect(page.locator("#app")).to_be_hidden()

    sign_in(page, api_key)
    expect(page.get_by_role("heading", name="Who would you like to talk to?")).to_be_visible()
    expect(page.locator("#picker-list li")).to_have_count(8)


def test_a_reply_streams_token_by_token_and_the_history_survives_a_reload(
    page: Page, api_key: str, app_server: ThreadedServer, provider: ScriptedProvider, api: httpx.Client
) -> None:
    gate = asyncio.Semaphore(0)  # used on the server's loop: released there, one token per release
    provider.queue(ScriptedReply("".join(REPLY_TOKENS), gate=gate))
    sign_in(page, api_key)
    start_chat(page, "Elara")
    send(page, "My name is Ana.")

    reply = page.locator("#messages li.assistant").last
    text = reply.locator(".text")
    expect(reply).to_have_attribute("data-status", "streaming")
    observed: list[str] = []
    for count in range(1, len(REPLY_TOKENS)):
        app_server.call_soon(gate.release)
        expect(text).to_have_text("".join(REPLY_TOKENS[:count]))
        observed.append(text.text_content() or "")
        expect(reply).to_have_attribute("data-status", "streaming")  # still going: not one final blob
    assert all(len(a) < len(b) for a, b in itertools.pairwise(observed)), observed
    app_server.call_soon(gate.release)
    expect(reply).to_have_attribute("data-status", "complete")
    expect(text).to_have_text("".join(REPLY_TOKENS))

    expect(page.locator("#messages li.user .text")).to_have_text(["My name is Ana."])
    expect(page.locator("#conversations li")).to_have_count(1)
    expect(page.locator("#conversations li").first).to_contain_text("My name is Ana.")
    expect(page).to_have_url(re.compile(r"#c=[0-9a-f-]{36}$"))

    page.reload()
    wait_ready(page)  # the session cookie kept us signed in
    expect(page.locator("#messages li .text")).to_have_text(["My name is Ana.", "".join(REPLY_TOKENS)])
    expect(page.locator("#title")).to_have_text("Elara")

    conversation = api.get("/v1/conversations").json()["data"]
    assert len(conversation) == 1 and conversation[0]["personality"] == "elara"


def test_a_message_sent_right_after_a_reply_is_not_wiped_by_the_late_refresh_of_the_last_one(
    page: Page, api_key: str, app_server: ThreadedServer, provider: ScriptedProvider
) -> None:
    """After a reply the page fetches the thread again (for ids and tools). When the next message is
    sent before that list arrives, the late list must not replace the thread, which would drop the
    reply streaming in (seen in CI: the screenshot test's streaming bubble vanished)."""
    gate = asyncio.Semaphore(0)
    second = "".join(REPLY_TOKENS)
    provider.queue("First reply.", ScriptedReply(second, gate=gate))
    held: list[Route] = []

    def thread_list(url: str) -> bool:
        return url.endswith("/messages?limit=100")

    def hold_list(route: Route) -> None:
        if route.request.method == "GET":
            held.append(route)
        else:
            route.continue_()

    sign_in(page, api_key)
    start_chat(page, "Elara")
    page.route(thread_list, hold_list)
    send(page, "One.")
    expect(page.locator("#messages li.assistant .text")).to_have_text(["First reply."])
    wait_until(lambda: held, what="the refresh after the first reply", page=page)
    expect(page.get_by_role("button", name="Send")).to_be_enabled()

    send(page, "Two.")  # the refresh after the first reply is still on its way
    expect(page.locator("#messages li.assistant").last).to_have_attribute("data-status", "streaming")
    stale = held.pop()
    with page.expect_response(lambda response: response.request.url == stale.request.url) as late:
        stale.continue_()
    late.value.finished()
    for _ in REPLY_TOKENS:
        app_server.call_soon(gate.release)
    # The refresh after this turn is held too: what shows is what the page streamed, not a reload.
    wait_until(lambda: held, what="the refresh after the second reply", page=page)
    expect(page.locator("#messages li.user .text")).to_have_text(["One.", "Two."])
    expect(page.locator("#messages li.assistant .text")).to_have_text(["First reply.", second])
    expect(page.locator("#messages li.assistant").last).to_have_attribute("data-status", "complete")

    held.pop().continue_()
    page.unroute(thread_list, hold_list)
    expect(page.locator("#messages li.assistant .regenerate")).to_have_count(2)  # the list with ids


def test_user_text_is_shown_as_text_never_as_html(page: Page, api_key: str) -> None:
    hostile = "<img src=x onerror=\"document.title='pwned'\"><b>bold</b> & <script>alert(1)</script>"
    sign_in(page, api_key)
    start_chat(page, "Orion")
    send(page, hostile)
    expect(page.locator("#messages li.assistant").last).to_have_attribute("data-status", "complete")
    expect(page.locator("#messages li.user .text")).to_have_text([hostile])
    expect(page.locator("#messages li.assistant .text")).to_have_text([f"You said: {hostile}"])
    expect(page.locator("#messages img, #messages b, #messages script")).to_have_count(0)
    assert page.title() == "companion"


def test_an_api_error_is_shown_to_the_user(page: Page, api_key: str, provider: ScriptedProvider) -> None:
    provider.queue(ScriptedReply("never said", fail_after=0))
    sign_in(page, api_key)
    start_chat(page, "Atlas")
    send(page, "Hello?")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_have_text("The scripted provider failed as scripted.")
    expect(page.locator("#messages li.user .text")).to_have_text(["Hello?"])  # stored before generating
    expect(page.locator("#messages li.assistant")).to_have_count(0)


def test_delete_one_memory_then_forget_everything(page: Page, api_key: str, api: httpx.Client) -> None:
    sign_in(page, api_key)
    start_chat(page, "Elara")
    send(page, "My name is Ana.")
    expect(page.locator("#messages li.assistant").last).to_have_attribute("data-status", "complete")
    # Remembered in the background after the exchange: the episode (what was said), then the fact.
    wait_until(
        lambda: {m["kind"] for m in api.get("/v1/memories").json()["data"]} == {"episode", "name"},
        what="the memory of Ana's name",
    )
    response = api.post("/v1/memories", json={"text": "I like green tea."})
    assert response.status_code == 201, response.text
    memories = api.get("/v1/memories").json()["data"]
    # Deleting the episode forgets the fact drawn from it too.
    name_memory = next(m for m in memories if "Ana" in m["text"] and m["kind"] == "episode")

    page.get_by_role("button", name="Memories").click()
    items = page.locator("#memory-list li")
    expect(items).to_have_count(3)
    expect(page.locator(f'#memory-list li[data-id="{name_memory["id"]}"]')).to_contain_text(name_memory["text"])

    page.locator(f'#memory-list li[data-id="{name_memory["id"]}"]').get_by_role("button").click()
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("green tea")
    assert [m["id"] for m in api.get("/v1/memories").json()["data"]] != [name_memory["id"]]
    assert all(m["id"] != name_memory["id"] for m in api.get("/v1/memories").json()["data"])

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Forget everything").click()
    expect(items).to_have_count(0)
    expect(page.get_by_text("Nothing remembered yet.")).to_be_visible()
    assert api.get("/v1/memories").json()["data"] == []


def test_create_and_edit_your_own_personality_and_chat_with_it(
    page: Page, api_key: str, provider: ScriptedProvider, api: httpx.Client
) -> None:
    sign_in(page, api_key)
    page.get_by_role("button", name="Personalities").click()
    page.get_by_label("Name (a-z").fill("captain")
    page.get_by_label("Display name").fill("Captain Mae")
    page.get_by_label("Description").fill("A sea captain with stories.")
    page.get_by_label("How it behaves").fill("You are Captain Mae, an old sea captain.")
    page.get_by_role("button", name="Create", exact=True).click()
    card = page.locator('#personality-list li[data-name="captain"]')
    expect(card).to_contain_text("Captain Mae")
    expect(card).to_contain_text("yours")

    card.get_by_role("button", name="Edit").click()
    expect(page.get_by_label("Name (a-z")).to_have_value("captain")
    page.get_by_label("Description").fill("A sea captain with tall tales.")
    page.get_by_label("How it behaves").fill("You are Captain Mae. Speak like a sailor.")
    page.get_by_role("button", name="Save").click()
    expect(card).to_contain_text("A sea captain with tall tales.")
    stored = api.get("/v1/personalities/captain").json()
    assert stored["system_prompt"] == "You are Captain Mae. Speak like a sailor." and stored["scope"] == "user"

    card.get_by_role("button", name="Chat").click()
    expect(page.locator("#title")).to_have_text("Captain Mae")
    send(page, "Ahoy!")
    expect(page.locator("#messages li.assistant .text")).to_have_text(["You said: Ahoy!"])
    assert "Speak like a sailor." in provider.prompts[-1][0].content


def test_preferences_are_saved_and_shown_again(page: Page, api_key: str, api: httpx.Client) -> None:
    sign_in(page, api_key)
    page.get_by_role("button", name="Preferences").click()
    page.get_by_label("Call me").fill("Ana")
    page.get_by_label("Tone").select_option("formal")
    page.get_by_label("Interests").fill("jazz, hiking")
    page.get_by_label("Let companions remember").uncheck()
    page.get_by_role("button", name="Save").click()
    expect(page.locator("#preferences-status")).to_have_text("Saved.")
    stored = api.get("/v1/preferences").json()
    assert (stored["preferred_name"], stored["tone"], stored["interests"], stored["memory_enabled"]) == (
        "Ana",
        "formal",
        ["jazz", "hiking"],
        False,
    )

    page.reload()
    wait_ready(page)
    page.get_by_role("button", name="Preferences").click()
    expect(page.get_by_label("Call me")).to_have_value("Ana")
    expect(page.get_by_label("Tone")).to_have_value("formal")
    expect(page.get_by_label("Interests")).to_have_value("jazz, hiking")
    expect(page.get_by_label("Let companions remember")).not_to_be_checked()


def test_sign_out_revokes_the_session_on_the_server(page: Page, api_key: str, app_server: ThreadedServer) -> None:
    sign_in(page, api_key)
    cookie = next(c for c in page.context.cookies() if c["name"] == "companion_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["secure"] is False
    assert "companion_session" not in page.evaluate("document.cookie")  # scripts cannot read it
    token = cookie["value"]
    with httpx.Client(base_url=app_server.base_url) as http:
        assert http.get("/v1/personalities", headers={"Authorization": f"Bearer {token}"}).status_code == 200

        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_label("API key")).to_be_visible()
        expect(page.locator("#signin-error")).to_have_text("You are signed out.")

        assert http.get("/v1/personalities", headers={"Authorization": f"Bearer {token}"}).status_code == 401
        assert http.get("/v1/personalities", headers={"Cookie": f"companion_session={token}"}).status_code == 401
        assert http.get("/web/session", headers={"Cookie": f"companion_session={token}"}).status_code == 401
        sessions = http.get("/v1/sessions", headers={"Authorization": f"Bearer {api_key}"}).json()
        assert sessions == []
    page.reload()
    expect(page.get_by_label("API key")).to_be_visible()  # the cookie is gone from the browser too


def test_on_a_phone_the_sidebar_is_a_drawer(new_page: Callable[..., Page], api_key: str) -> None:
    page = new_page(viewport=PHONE, is_mobile=True, has_touch=True)
    sign_in(page, api_key)
    sidebar = page.locator("#sidebar")
    expect(sidebar).not_to_be_in_viewport()
    page.get_by_role("button", name="Open the menu").click()
    expect(sidebar).to_be_in_viewport(ratio=0.9)
    page.get_by_role("button", name="Preferences").click()
    expect(sidebar).not_to_be_in_viewport()
    expect(page.get_by_label("Call me")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways ({width}px wide)"
