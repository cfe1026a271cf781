"""Serialization for cached values: pydantic models to and from JSON bytes (orjson inside pydantic),
never pickle. A cached miss is the one byte `!`, which no JSON document starts with."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)
MISS_MARKER = b"!"


class ModelCodec(Generic[M]):
    def __init__(self, model: type[M]) -> None:
        self.model = model

    def encode(self, value: M) -> bytes:
        return value.model_dump_json().encode()

    def decode(self, data: bytes) -> M:
        return self.model.model_validate_json(data)
