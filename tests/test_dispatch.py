"""The hand-packed LPUSH equals redis-py's own packing."""

from __future__ import annotations

import redis
from hypothesis import given
from hypothesis import strategies as st

from ingestd.celery.dispatch import pack_lpush


@given(st.text(min_size=1, max_size=50), st.lists(st.binary(max_size=8000), min_size=1,
                                                  max_size=30))
def test_pack_lpush_equals_redis_py(key: str, values: list[bytes]) -> None:
    theirs = b"".join(redis.Connection().pack_command("LPUSH", key, *values))
    assert pack_lpush(key.encode(), values) == theirs
