"""While Redis is down the page says the service is degraded, and signing in and chatting keep working."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from companion.config import Settings
from tests.browser.conftest import free_port, send, sign_in, start_chat
from tests.conftest import make_settings


@pytest.fixture
def web_settings(web_settings: Settings) -> Settings:
    # Redis is enabled, but nothing listens on its port.
    return make_settings(
        web_settings.database_url.get_secret_value(),
        web_settings.data_dir,
        redis_enabled=True,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )


def test_a_degraded_service_shows_a_notice_and_chat_keeps_working(page: Page, api_key: str) -> None:
    page.goto("/")
    notice = page.locator("#notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("degraded")
    expect(notice).to_contain_text("Redis")

    sign_in(page, api_key)
    start_chat(page, "Luna")
    send(page, "Still there?")
    expect(page.locator("#messages li.assistant .text")).to_have_text(["You said: Still there?"])
    expect(notice).to_be_visible()
