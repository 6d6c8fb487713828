"""Tiny msgspec schemas for ``--schema module:Struct`` tests."""

from __future__ import annotations

from typing import Annotated

import msgspec


class Reading(msgspec.Struct):
    """A custom record schema: a sensor reading; other fields are allowed and kept."""

    sensor: Annotated[str, msgspec.Meta(min_length=1)]
    reading: float
    unit: str = "C"


class NotAStruct:
    """A plain class: naming it as a schema is a configuration error."""

    sensor: str


NOT_A_TYPE = 42
