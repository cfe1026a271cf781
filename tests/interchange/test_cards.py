"""Character cards read from files shaped like real ones, and written back: V1/V2/V3 JSON, PNGs
with `chara` and/or `ccv3` chunks, malformed cards (422 naming the field), round trips that keep
unknown fields, and the personality a card becomes."""

from __future__ import annotations

import base64

import orjson
import pytest

from companion.errors import InvalidInput
from companion.interchange import cards, png
from tests.support import cards as files


def test_a_v2_json_card_keeps_every_field():
    parsed = cards.parse_card(files.as_json(files.V2))
    assert parsed.avatar is None
    assert parsed.card.spec == "chara_card_v2"
    data = parsed.card.data
    assert data.name == "Captain Mira Vale"
    assert data.alternate_greetings == files.V2["data"]["alternate_greetings"]
    assert data.character_book is not None and len(data.character_book.entries) == 3
    assert data.extensions["depth_prompt"] == {"prompt": "", "depth": 4}


def test_v2_export_gives_back_what_came_in_including_unknown_fields():
    source = files.v2(extensions={"chub": {"id": 123, "full_path": "someone/mira"}, "x_custom": [1, 2]})
    source["data"]["some_future_field"] = {"kept": True}
    source["data"]["character_book"]["entries"][0]["extensions"]["sillytavern/probability"] = 80
    exported = cards.to_v2(cards.parse_card(files.as_json(source)).card)
    assert exported == source


def test_a_v3_card_keeps_its_v3_fields_and_uses_the_nickname_for_char():
    parsed = cards.parse_card(files.as_json(files.v3()))
    assert parsed.card.spec == "chara_card_v3"
    exported = cards.to_v2(parsed.card)["data"]
    assert exported["assets"] == files.v3()["data"]["assets"]
    assert exported["source"] == ["https://example.invalid/cards/mira"]
    assert cards.greetings(parsed.card.data)[0].startswith("*Cap looks up")


def test_a_v1_card_reads_its_root_fields_and_old_macros():
    parsed = cards.parse_card(files.as_json(files.v1()))
    assert parsed.card.spec == "chara_card_v1"
    prompt = cards.system_prompt(parsed.card.data)
    assert "<BOT>" not in prompt and "Old Tom is a lighthouse keeper" in prompt
    assert "talks to Ana about the sea" in cards.fill_user(prompt, "Ana")
    assert cards.greetings(parsed.card.data) == ["Ahoy, <USER>."]


def test_a_png_with_both_chunks_uses_ccv3():
    raw = files.as_png(chara=files.v2(name="From chara"), ccv3=files.v3(name="From ccv3", nickname=None))
    parsed = cards.parse_card(raw)
    assert parsed.card.data.name == "From ccv3"
    assert parsed.card.spec == "chara_card_v3"
    assert parsed.avatar is not None and parsed.card.has_avatar
    # The picture is kept without its card chunks.
    assert "chara" not in png.text_chunks(parsed.avatar) and "ccv3" not in png.text_chunks(parsed.avatar)


def test_a_png_with_only_chara_is_read():
    parsed = cards.parse_card(files.as_png(chara=files.V2))
    assert parsed.card.data.name == "Captain Mira Vale"


def test_the_png_export_carries_the_card_in_the_picture_it_came_in():
    picture = png.minimal_png(4, 4, (1, 2, 3))
    parsed = cards.parse_card(files.as_png(chara=files.V2, picture=picture))
    exported = cards.to_png(parsed.card, parsed.avatar)
    texts = png.text_chunks(exported)
    assert orjson.loads(base64.b64decode(texts["chara"])) == files.V2
    assert orjson.loads(base64.b64decode(texts["ccv3"]))["spec"] == "chara_card_v3"
    image_chunks = [(k, b) for k, b in png.chunks(exported) if k != b"tEXt"]
    assert image_chunks == list(png.chunks(picture))
    # And it imports again (from `ccv3`, which V3 requires to list group-only greetings) to the same card.
    again = cards.to_v2(cards.parse_card(exported).card)
    assert again["data"] == {**files.V2["data"], "group_only_greetings": []}


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (files.as_json(files.v2(name=42)), "data.name"),
        (files.as_json(files.v2(name="")), "data.name"),
        (files.as_json(files.v2(first_mes=["not", "text"])), "data.first_mes"),
        (files.as_json(files.v2(alternate_greetings="one string")), "data.alternate_greetings"),
        (files.as_json(files.v2(description="bad \x00 byte")), "data.description"),
        (files.as_json({"spec": "chara_card_v2", "data": "nope"}), "data"),
        (files.as_json({"spec": "chara_card_v9", "data": {}}), "spec"),
        (files.as_json({"description": "no name"}), "name"),
        (b"{not json", "file"),
        (b"\xff\xfe garbage", "file"),
        (b"[1, 2]", "file"),
        (png.minimal_png(), "file"),  # a picture without a card
        (files.as_png(chara=files.V2)[:-20], "file"),  # cut short
    ],
)
def test_a_malformed_card_is_rejected_naming_the_field(raw: bytes, param: str):
    with pytest.raises(InvalidInput) as caught:
        cards.parse_card(raw)
    assert caught.value.param == param, caught.value.message
    assert caught.value.code == "invalid_card"


def test_a_bad_lorebook_entry_names_its_path():
    book = dict(files.LOREBOOK, entries=[{"keys": "lighthouse", "content": "x"}])
    with pytest.raises(InvalidInput) as caught:
        cards.parse_card(files.as_json(files.v2(character_book=book)))
    assert caught.value.param == "data.character_book.entries.0.keys"


def test_a_damaged_png_chunk_is_rejected():
    raw = bytearray(files.as_png(chara=files.V2))
    raw[40] ^= 0xFF  # inside a chunk: its CRC no longer matches
    with pytest.raises(InvalidInput) as caught:
        cards.parse_card(bytes(raw))
    assert "PNG" in caught.value.message


def test_a_chunk_that_is_not_base64_json_names_the_chunk():
    raw = png.with_text(png.minimal_png(), {"chara": "!!!not base64!!!"})
    with pytest.raises(InvalidInput) as caught:
        cards.parse_card(raw)
    assert caught.value.param == "chara"


def test_size_is_bounded():
    with pytest.raises(InvalidInput) as caught:
        cards.parse_card(b" " * (cards.MAX_CARD_BYTES + 1))
    assert caught.value.code == "card_too_large"


def test_the_system_prompt_has_the_definition_but_never_the_creator_fields():
    data = cards.parse_card(files.as_json(files.V2)).card.data
    prompt = cards.system_prompt(data)
    assert prompt.startswith("You are Captain Mira Vale.")  # {{original}}: the default prompt
    assert "Never break character." in prompt
    assert "retired sea captain" in prompt and "gruff, warm, nostalgic" in prompt
    assert "rainy evening" in prompt and "The gulls know more" in prompt
    assert "{{char}}" not in prompt and "{{user}}" in prompt  # the user's name comes per prompt
    for secret in ("SECRET-CREATOR-NOTE", "SECRET-TAG", "SECRET-CREATOR", "1.2"):
        assert secret not in prompt
    assert "SECRET-CREATOR-NOTE" in cards.blurb(data)  # shown to people instead


def test_slugs():
    assert cards.slug("Captain Mira Vale") == "captain-mira-vale"
    assert cards.slug("Dr. Élise Moreau!") == "dr-elise-moreau"
    assert cards.slug("日本") == "character"
    assert len(cards.slug("x" * 100)) == 40
