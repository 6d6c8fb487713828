"""Types of ``ingestd/_native.c`` (the hot path in C)."""

from collections.abc import Callable
from typing import Any

def argsrepr(raw: bytes, maxsize: int, /) -> bytes | None: ...
def encode_each(fragments: tuple[bytes, ...], slots: bytes, head: bytes, tail: bytes,
                maxsize: int, tasks: list[Any], tags: list[bytes],
                fallback: Callable[[Any], bytes], key: bytes | None, /) -> Any:
    """A list of envelopes; given a key, the LPUSH command (bytes)."""
def configure_headers(message_type: type, headers_at: int, c_headers_at: int,
                      get_all: int, /) -> None: ...
def record_headers(msg: Any, /) -> list[tuple[str | bytes, bytes | None]] | None: ...
