"""``ingestd._native`` (the hot path in C) gives what the Python path gives, byte for byte.

The Python path is proved equal to ``send_task`` in ``tests/test_codec.py``; the
envelope comparisons there run with and without the C module. Here, on JSON texts
as producers write them (any white space, any number notation, escapes):

- ``argsrepr`` answers only what the Python path answers, and answers for the common
  record, or it would save nothing;
- ``encode_each`` writes the same envelopes as the Python loop, and packed in one LPUSH
  command the same bytes as ``dispatch.pack_lpush``;
- a typed validator (``Validator(typed=True)``, which skips the dict) accepts and
  refuses exactly what the dict path does, with the same reason and detail.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import orjson
import pytest
from celery import Celery
from celery.utils.saferepr import saferepr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from benchmarks import pipes
from ingestd.celery import codec, dispatch
from ingestd.errors import RecordError
from ingestd.schema import Validator
from tests.test_codec import CURATED, json_objects, signals

native = codec.native
_hyp = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_the_dev_install_builds_the_module() -> None:
    assert native is not None, "ingestd._native is not built: pip found no C compiler"


# --- JSON texts as producers write them ---------------------------------------------------

_ws = st.sampled_from(["", " ", "  ", "\n", "\t", "\r\n "])
_numbers = st.from_regex(r"\A-?(0|[1-9][0-9]{0,22})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?\Z")
_string_chars = st.sampled_from(
    [*"abcXYZ019 .:,-_/{}[]'\"\\é€😀", "\x7f", "\x1f", "\u2028"])


@st.composite
def _strings(draw: st.DrawFn) -> str:
    text = "".join(draw(st.lists(_string_chars, max_size=12)))
    return json.dumps(text, ensure_ascii=draw(st.booleans()))


_scalars = _numbers | _strings() | st.sampled_from(["true", "false", "null"])


def _join(draw: st.DrawFn, items: list[str], open_: str, close: str) -> str:
    return open_ + draw(_ws) + (draw(_ws) + "," + draw(_ws)).join(items) + draw(_ws) + close


@st.composite
def _objects(draw: st.DrawFn, values: st.SearchStrategy[str]) -> str:
    keys = draw(st.lists(_strings(), max_size=5))
    if keys and draw(st.booleans()):
        keys.append(draw(st.sampled_from(keys)))  # a repeated key
    items = [k + draw(_ws) + ":" + draw(_ws) + draw(values) for k in keys]
    return _join(draw, items, "{", "}")


@st.composite
def _arrays(draw: st.DrawFn, values: st.SearchStrategy[str]) -> str:
    return _join(draw, draw(st.lists(values, max_size=4)), "[", "]")


_values = st.recursive(_scalars, lambda inner: _objects(inner) | _arrays(inner), max_leaves=20)
json_texts = st.builds(lambda ws, text, ws2: (ws + text + ws2).encode(), _ws, _objects(_values),
                       _ws)
# Records as Python producers write them, and as orjson does
records = st.builds(lambda o, compact: orjson.dumps(o) if compact else json.dumps(o).encode(),
                    json_objects | signals, st.booleans())


def _decoded(raw: bytes) -> object:
    """The record as the validator decodes it; a text it refuses never reaches the codec."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        assume(False)
        raise


def _python_argsrepr(raw: bytes, maxsize: int) -> bytes:
    with_native, codec.native = codec.native, None
    try:
        return codec.record_argsrepr(raw, _decoded(raw), maxsize)
    finally:
        codec.native = with_native


# --- argsrepr --------------------------------------------------------------------------------

@_hyp
@given(raw=json_texts | records, maxsize=st.sampled_from([1024, 1024, 40, 200, 5000]))
def test_argsrepr_is_the_python_paths(raw: bytes, maxsize: int) -> None:
    assert native is not None
    mine = native.argsrepr(raw, maxsize)
    if mine is not None:
        assert mine == _python_argsrepr(raw, maxsize)
        assert json.loads(mine) == saferepr([json.loads(raw)], maxsize)  # the worker's view


@_hyp
@given(raw=json_texts, cut=st.integers(0, 1000), junk=st.sampled_from(["", "x", ",", "}", "0"]))
def test_argsrepr_refuses_what_is_not_json(raw: bytes, cut: int, junk: str) -> None:
    assert native is not None
    broken = raw[:cut % (len(raw) + 1)] + junk.encode() + raw[cut % (len(raw) + 1) + 1:]
    try:
        json.loads(broken)
    except ValueError:
        assert native.argsrepr(broken, 1024) is None


@pytest.mark.parametrize("raw", [
    pipes.signal(7), pipes.signal(123_456, sent=1764650000.123456),
    orjson.dumps(CURATED[0]), orjson.dumps(CURATED[1]), json.dumps(CURATED[1]).encode(),
    b'{"name":"n","value":-0,"source":"s","timestamp":1e3,"ok":true,"x":null,"l":[1,2.5],"o":{}}',
    b'{"v": 0.0001, "w": 1234567890123450.0, "x": 5E-7, "y": 1.50, "z": 0.30000000000000004}',
], ids=lambda raw: raw[:30].decode())
def test_argsrepr_answers_for_common_records(raw: bytes) -> None:
    assert native is not None
    assert native.argsrepr(raw, 1024) == _python_argsrepr(raw, 1024)


@pytest.mark.parametrize(("raw", "why"), [
    (b'{"a": "it\'s"}', "a single quote: repr picks double quotes"),
    (b'{"a": "\\u00e9"}', "an escape"),
    ('{"a": "é"}'.encode(), "not ASCII"),
    (b'{"a": "\x7f"}', "DEL prints as \\x7f"),
    (b'{"a": 1, "a": 2}', "a repeated key"),
    (b'{"a": {"b": {"c": 1}}}', "a container below the record's children"),
    (b'[1]', "not an object"),
    (b'{"a": "' + b"x" * 1100 + b'"}', "longer than maxsize: saferepr cuts"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_argsrepr_leaves_the_rest_to_python(raw: bytes, why: str) -> None:
    assert native is not None
    assert native.argsrepr(raw, 1024) is None, why


def test_argsrepr_leaves_long_integers_to_python() -> None:
    """Python prints no int longer than its limit (``sys.set_int_max_str_digits``: 4300 by
    default, never below 640): C answers only below the lowest limit."""
    assert native is not None
    assert native.argsrepr(b'{"n": ' + b"7" * 640 + b"}", 10_000) is not None
    assert native.argsrepr(b'{"n": ' + b"7" * 641 + b"}", 10_000) is None


@pytest.mark.parametrize("pad", range(1000, 1030))
def test_argsrepr_at_the_truncation_boundary(pad: int) -> None:
    raw = b'{"s": "' + b"x" * (pad - 12) + b'"}'
    assert native is not None
    mine = native.argsrepr(raw, 1024)
    assert (mine is None) == (len(repr([json.loads(raw)])) >= 1024)
    assert mine is None or mine == _python_argsrepr(raw, 1024)


# --- envelopes -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def envelopes() -> codec.RedisEnvelopes:
    app = Celery("ingestd-test", broker="redis://127.0.0.1:1/0", set_as_current=False)
    return codec.RedisEnvelopes(codec.MessageBuilder(codec.capture(app, "t", "celery")))


@_hyp
@given(raws=st.lists(json_texts | records, min_size=1, max_size=5))
def test_encode_each_is_the_python_loops(envelopes: codec.RedisEnvelopes,
                                         raws: list[bytes]) -> None:
    tasks = [dispatch.Task(f"t-0-{i}", "t", [raw], [_decoded(raw)])
             for i, raw in enumerate(raws)]
    tags = codec.delivery_tags(len(tasks))
    mine = envelopes.encode_each(tasks, tags)
    with_native, codec.native = codec.native, None
    try:
        theirs = envelopes.encode_each(tasks, tags)
    finally:
        codec.native = with_native
    assert mine == theirs


@_hyp
@given(raws=st.lists(json_texts | records, min_size=1, max_size=5),
       key=st.sampled_from([b"celery", b"q", b"x" * 300]))
def test_lpush_each_is_pack_lpush_of_the_envelopes(envelopes: codec.RedisEnvelopes,
                                                   raws: list[bytes], key: bytes) -> None:
    tasks = [dispatch.Task(f"t-0-{i}", "t", [raw], [_decoded(raw)])
             for i, raw in enumerate(raws)]
    tags = codec.delivery_tags(len(tasks))
    assert envelopes.lpush_each(key, tasks, tags) == dispatch.pack_lpush(
        key, envelopes.encode_each(tasks, tags))


def test_lpush_each_grows_its_buffer() -> None:
    """Far more than the first guess of 1 KiB a record: the command grows as it is written."""
    app = Celery("ingestd-test", broker="redis://127.0.0.1:1/0", set_as_current=False)
    env = codec.RedisEnvelopes(codec.MessageBuilder(codec.capture(app, "t", "celery")))
    raws = [json.dumps({"s": "x" * 5000, "i": i}).encode() for i in range(50)]
    tasks = [dispatch.Task(f"t-0-{i}", "t", [raw], [None]) for i, raw in enumerate(raws)]
    tags = codec.delivery_tags(len(tasks))
    assert env.lpush_each(b"celery", tasks, tags) == dispatch.pack_lpush(
        b"celery", env.encode_each(tasks, tags))


def test_encode_each_holds_its_inputs_while_the_fallback_runs() -> None:
    """The fallback is Python code: whatever it does to the lists handed over, C keeps what
    it was given (a fallback clearing them once freed the tasks under C's feet)."""
    assert native is not None
    app = Celery("ingestd-test", broker="redis://127.0.0.1:1/0", set_as_current=False)
    env = codec.RedisEnvelopes(codec.MessageBuilder(codec.capture(app, "t", "celery")))
    raws = [b'{"a": "it\'s"}', b'{"b": "\\u00e9"}']  # both need the Python path
    tasks = [dispatch.Task(f"t-0-{i}", "t", [raw], [None]) for i, raw in enumerate(raws)]
    tags = codec.delivery_tags(len(tasks))
    expected = env.encode_each(tasks, tags)
    fragments, slots, head, tail, maxsize, *_ = env._native_args(tasks, tags)
    for key in (None, b"celery"):
        # Objects that only these lists hold: cleared, they are freed at once.
        given: list[Any] = [dispatch.Task(t.task_id, t.topic, [b"%b" % t.raws[0]], [None])
                            for t in tasks]
        given_tags = [b"%b" % tag for tag in tags]

        def hostile(task: dispatch.Task, given: list[Any] = given,
                    given_tags: list[bytes] = given_tags) -> bytes:
            given.clear()
            given_tags.clear()
            return codec.record_argsrepr(task.raws[0], None, maxsize)

        got = native.encode_each(fragments, slots, head, tail, maxsize, given, given_tags,
                                 hostile, key)
        assert got == (expected if key is None else dispatch.pack_lpush(key, expected))


def test_encode_each_refuses_bad_arguments_with_an_exception(
        envelopes: codec.RedisEnvelopes) -> None:
    assert native is not None
    tasks = [dispatch.Task("t-0-0", "t", [b'{"a": 1}'], [None])]
    fragments, slots, head, tail, _, _, tags, fallback = envelopes._native_args(
        tasks, codec.delivery_tags(1))
    for maxsize in (-5, 2**62):
        with pytest.raises(ValueError):
            native.encode_each(fragments, slots, head, tail, maxsize, tasks, tags, fallback,
                               None)
    with pytest.raises(TypeError):
        native.encode_each(fragments, slots, head, tail, 1024, [("t-0-0", "t")], tags,
                           fallback, None)


def test_lpush_each_with_a_long_key(envelopes: codec.RedisEnvelopes) -> None:
    """The command's header is printed into a fixed buffer: a long key and many records."""
    raws = [b'{"i": %d}' % i for i in range(3000)]
    tasks = [dispatch.Task(f"t-0-{i}", "t", [raw], [None]) for i, raw in enumerate(raws)]
    tags = codec.delivery_tags(len(tasks))
    key = b"k" * 100_000
    assert envelopes.lpush_each(key, tasks, tags) == dispatch.pack_lpush(
        key, envelopes.encode_each(tasks, tags))


def test_encode_each_decodes_what_a_typed_validator_did_not(
        envelopes: codec.RedisEnvelopes) -> None:
    raw = json.dumps({**CURATED[0], "city": "São Paulo"}).encode()  # not ASCII: Python's
    record = Validator("signal", 1 << 20, typed=True).check(raw)
    assert record is None
    (mine,) = envelopes.encode_each([dispatch.Task("t-0-0", "t", [raw], [record])],
                                    codec.delivery_tags(1))
    assert json.loads(mine)["headers"]["argsrepr"] == saferepr([json.loads(raw)], 1024)


# --- the typed validator ---------------------------------------------------------------------

_signal_texts = st.builds(
    lambda obj, extra: json.dumps({**extra, **obj}).encode(),
    st.fixed_dictionaries({
        "name": st.sampled_from(["", "cpu", 1]), "value": st.sampled_from(
            [1, 1.5, -0.0, 1e308, "1", None, True, 10**400]),
        "source": st.sampled_from(["s", 2]),
        "timestamp": st.sampled_from([0, 1.5, "2024-05-01T12:00:00Z", "2024-05-01T12:00:00",
                                      "x", None])},
        optional={"id": st.sampled_from(["a", None, 3]),
                  "tags": st.sampled_from([{}, {"k": "v"}, {"k": 1}, None, []])}),
    st.dictionaries(st.sampled_from(["extra", "n", "name"]), st.integers()))


def _outcome(validator: Validator, raw: bytes | None) -> tuple[str, str]:
    try:
        validator.check(raw)
    except RecordError as exc:
        return exc.reason, exc.detail
    return "ok", ""


@_hyp
@given(raw=_signal_texts | json_texts | records | st.binary(max_size=40)
       | st.sampled_from([None, b"", b"[]", b"1e999", b'{"value": 1e999}']))
def test_typed_validator_agrees_with_the_dict_path(raw: bytes | None) -> None:
    typed = Validator("signal", 1 << 20, typed=True)
    plain = Validator("signal", 1 << 20)
    assert _outcome(typed, raw) == _outcome(plain, raw)


def test_typed_validator_skips_the_dict() -> None:
    assert Validator("signal", 1 << 20, typed=True).check(pipes.signal(1)) is None
    assert Validator("object", 1 << 20, typed=True).check(pipes.signal(1)) == json.loads(
        pipes.signal(1))
