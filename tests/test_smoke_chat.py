"""The core loop over real HTTP: create a conversation, stream a reply, read the history."""

from __future__ import annotations

import httpx

from companion.llm.scripted import ScriptedProvider
from tests.support.live import iter_sse


async def _chat(client: httpx.AsyncClient, conversation_id: str, content: str) -> list:
    async with client.stream(
        "POST", f"/v1/conversations/{conversation_id}/messages", json={"content": content}
    ) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [event async for event in iter_sse(response)]


async def test_streamed_reply_is_stored_and_history_is_used(client: httpx.AsyncClient, provider: ScriptedProvider):
    provider.queue("Hello there, friend.", "Second reply.")
    created = await client.post("/v1/conversations", json={"personality": "elara"})
    assert created.status_code == 201, created.text
    conversation_id = created.json()["id"]

    events = await _chat(client, conversation_id, "Hi Elara")
    kinds = [e.event for e in events]
    assert kinds[0] == "message" and kinds[-1] == "done"
    tokens = [e.json()["text"] for e in events if e.event == "token"]
    assert tokens == ["Hello ", "there, ", "friend."]
    done = events[-1].json()
    assert done["content"] == "Hello there, friend."
    assert done["usage"]["completion_tokens"] == 3

    await _chat(client, conversation_id, "And again")
    second_prompt = provider.prompts[1]
    assert [m.role for m in second_prompt] == ["system", "user", "assistant", "user"]
    assert second_prompt[1].content == "Hi Elara" and second_prompt[2].content == "Hello there, friend."
    assert "Elara" in second_prompt[0].content

    history = (await client.get(f"/v1/conversations/{conversation_id}/messages")).json()
    assert [(m["role"], m["content"], m["status"]) for m in history["data"]] == [
        ("user", "Hi Elara", "complete"),
        ("assistant", "Hello there, friend.", "complete"),
        ("user", "And again", "complete"),
        ("assistant", "Second reply.", "complete"),
    ]
