"""schema.Validator: every dead-letter category, valid records kept verbatim, and a fuzz test."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd import schema
from ingestd.errors import ConfigError, RecordError
from ingestd.schema import DECODE, NOT_OBJECT, SCHEMA, TOO_LARGE, Validator, count_items

MAX = 1 << 20
VALID: dict[str, Any] = {"name": "cpu", "value": 0.5, "source": "host-1", "timestamp": 1714557600}


def _raw(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _signal(**changes: Any) -> bytes:
    return _raw({**VALID, **changes})


def _without(field: str) -> bytes:
    return _raw({k: v for k, v in VALID.items() if k != field})


def _refused(validator: Validator, raw: bytes | None, reason: str) -> RecordError:
    with pytest.raises(RecordError) as info:
        validator.check(raw)
    err = info.value
    assert err.reason == reason, err
    assert err.reason in schema.REASONS
    assert err.detail
    assert len(err.detail) <= schema.DETAIL_MAX
    assert str(err) == f"{err.reason}: {err.detail}"
    return err


@pytest.fixture
def signal() -> Validator:
    return Validator("signal", MAX)


# --- decode --------------------------------------------------------------------------------------

DEEP = 10_000


@pytest.mark.parametrize("raw", [
    pytest.param(b"\xff\xfe\xfd", id="invalid-utf8"),
    pytest.param(b'{"name": "caf\xe9", "value": 1, "source": "s", "timestamp": 1}',
                 id="latin1-in-string"),
    pytest.param(b'{"name": "\xed\xa0\x80"}', id="utf8-encoded-surrogate"),
    pytest.param(b"{not json", id="bad-json"),
    pytest.param(b'{"name": "n",}', id="trailing-comma"),
    pytest.param(b"{'name': 'n'}", id="single-quotes"),
    pytest.param(b'{"name": "n"', id="truncated"),
    pytest.param(b'{"name": "n"} {"name": "m"}', id="two-documents"),
    pytest.param(b'{"value": NaN}', id="nan-token"),
    pytest.param(b'{"value": Infinity}', id="infinity-token"),
    pytest.param(b'{"value": -Infinity}', id="minus-infinity-token"),
    pytest.param(b'{"value": 1e400}', id="number-overflows-to-infinity"),
    pytest.param(b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}", id="10000-deep-arrays"),
    pytest.param(b'{"a": ' * DEEP + b"1" + b"}" * DEEP, id="10000-deep-objects"),
    pytest.param(b"\x00", id="nul"),
    pytest.param(b"\x00" * 16, id="nuls"),
    pytest.param(b'{"name": "a\x00b", "value": 1, "source": "s", "timestamp": 1}',
                 id="raw-nul-in-string"),
    pytest.param(b'{"name": "a\nb", "value": 1, "source": "s", "timestamp": 1}',
                 id="raw-newline-in-string"),
    pytest.param(b'{"a": 1}\x00', id="nul-after-object"),
    pytest.param(b'\xef\xbb\xbf{"a": 1}', id="utf8-bom"),
    pytest.param(b'{"a": "\\ud800"}', id="lone-surrogate-escape"),
    pytest.param(b"   ", id="whitespace-only"),
])
def test_decode_errors(raw: bytes) -> None:
    # No item limit here: 10,000 nested arrays are over the default one (too_large).
    _refused(Validator("signal", MAX, max_record_items=10**9), raw, DECODE)


def test_deep_nesting_is_over_the_default_item_limit(signal: Validator) -> None:
    assert "JSON items > 10000" in _refused(signal, b"[" * DEEP + b"]" * DEEP, TOO_LARGE).detail


def test_empty_and_tombstone_are_decode_errors(signal: Validator) -> None:
    assert "empty" in _refused(signal, b"", DECODE).detail
    assert "tombstone" in _refused(signal, None, DECODE).detail


@pytest.mark.parametrize("schema_name", ["signal", "object", "tests.schemas:Reading"])
def test_decode_errors_do_not_depend_on_schema(schema_name: str) -> None:
    v = Validator(schema_name, MAX)
    for raw in (None, b"", b"{", b'{"v": NaN}', b"\xff"):
        _refused(v, raw, DECODE)


def _nested(depth: int) -> bytes:
    raw = _signal(nested=0)
    return raw.replace(b'"nested":0}', b'"nested":' + b"[" * depth + b"]" * depth + b"}")


@pytest.mark.parametrize("depth", [3, 50, 200])
def test_moderate_nesting_is_accepted(signal: Validator, depth: int) -> None:
    assert signal.check(_nested(depth))["name"] == VALID["name"]


@pytest.mark.parametrize("depth", [600, 900])
def test_nesting_a_celery_worker_cannot_handle_is_refused(signal: Validator, depth: int) -> None:
    _refused(signal, _nested(depth), DECODE)


# --- not_object ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"[]", b"[" + _raw(VALID) + b"]", b'"a string"', b'""', b"42",
                                 b"-1.5e3", b"null", b"true", b"false", b" [1, 2] "])
@pytest.mark.parametrize("schema_name", ["signal", "object", "tests.schemas:Reading"])
def test_not_object(raw: bytes, schema_name: str) -> None:
    err = _refused(Validator(schema_name, MAX), raw, NOT_OBJECT)
    assert "expected object" in err.detail


# --- schema --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "where"), [
    (_without("name"), "name"),
    (_without("value"), "value"),
    (_without("source"), "source"),
    (_without("timestamp"), "timestamp"),
    (b"{}", ""),
    (_signal(name=""), "$.name"),
    (_signal(name=5), "$.name"),
    (_signal(name=None), "$.name"),
    (_signal(value=True), "$.value"),
    (_signal(value=False), "$.value"),
    (_signal(value="1.5"), "$.value"),
    (_signal(value=None), "$.value"),
    (_signal(value=[1]), "$.value"),
    (_signal(source=1), "$.source"),
    (_signal(source=None), "$.source"),
    (_signal(timestamp="2024-05-01T12:00:00"), "$.timestamp"),  # naive: no time zone
    (_signal(timestamp="2024-05-01 12:00"), "$.timestamp"),
    (_signal(timestamp="yesterday"), "$.timestamp"),
    (_signal(timestamp="1714557600"), "$.timestamp"),
    (_signal(timestamp=True), "$.timestamp"),
    (_signal(timestamp=None), "$.timestamp"),
    (_signal(timestamp={"s": 1}), "$.timestamp"),
    (_signal(tags={"env": 1}), "$.tags"),
    (_signal(tags={"env": None}), "$.tags"),
    (_signal(tags={"env": ["a"]}), "$.tags"),
    (_signal(tags=["env"]), "$.tags"),
    (_signal(tags="env=prod"), "$.tags"),
    (_signal(id=5), "$.id"),
])
def test_schema_errors(signal: Validator, raw: bytes, where: str) -> None:
    err = _refused(signal, raw, SCHEMA)
    assert where in err.detail


def test_schema_error_detail_is_bounded(signal: Validator) -> None:
    raw = _signal(tags={"k" * 5000: 1})
    err = _refused(signal, raw, SCHEMA)
    assert len(err.detail.encode()) <= 1024


# --- too_large -----------------------------------------------------------------------------------


def test_too_large() -> None:
    raw = _signal(pad="x" * 200)
    v = Validator("signal", len(raw) - 1)
    err = _refused(v, raw, TOO_LARGE)
    assert str(len(raw)) in err.detail
    assert Validator("signal", len(raw)).check(raw) == orjson.loads(raw)  # the limit is inclusive


@pytest.mark.parametrize("raw", [b"{not json" + b" " * 100, b"[" * 200, b"\xff" * 200])
def test_too_large_is_checked_before_decoding(raw: bytes) -> None:
    _refused(Validator("object", 100), raw, TOO_LARGE)


# --- valid signals -------------------------------------------------------------------------------


@pytest.mark.parametrize("obj", [
    VALID,
    {**VALID, "value": 0},
    {**VALID, "value": -3},
    {**VALID, "value": 2**63 - 1},
    {**VALID, "value": 1.7976931348623157e308},
    {**VALID, "value": 5e-324},
    {**VALID, "timestamp": 0},
    {**VALID, "timestamp": 1714557600.123456},
    {**VALID, "source": ""},
    {**VALID, "name": "ünïcødé 😀"},
    {**VALID, "id": "sig-1", "tags": {"env": "prod", "": "", "é": "😀"}},
    {**VALID, "id": None, "tags": None},
    {**VALID, "tags": {}},
    {**VALID, "extra": {"deep": [1, {"x": None}]}, "flag": True, "n": None, "s": "\x00"},
])
def test_valid_signal_is_returned_unchanged(signal: Validator, obj: dict[str, Any]) -> None:
    raw = _raw(obj)
    got = signal.check(raw)
    assert got == obj
    assert list(got) == list(obj)  # field order kept as well


@pytest.mark.parametrize("ts", [
    "2024-05-01T12:00:00Z",
    "2024-05-01T12:00:00z",
    "2024-05-01T12:00:00+00:00",
    "2024-05-01T12:00:00-07:30",
    "2024-05-01T12:00:00.123456+02:00",
    "2024-05-01T12:00:00.1Z",
    "1970-01-01T00:00:00Z",
])
def test_rfc3339_timestamps(signal: Validator, ts: str) -> None:
    got = signal.check(_signal(timestamp=ts))
    assert got["timestamp"] == ts  # kept as the original string, not parsed into a datetime


def test_extra_fields_kept(signal: Validator) -> None:
    raw = (b'{"zeta": [1, 2, {"k": "v"}], "name": "n", "value": 1.5, "source": "s",'
           b' "timestamp": "2024-05-01T12:00:00Z", "alpha": null, "tags": {"a": "b"}}')
    got = signal.check(raw)
    assert got == json.loads(raw)
    assert list(got) == ["zeta", "name", "value", "source", "timestamp", "alpha", "tags"]


def test_whitespace_around_a_valid_record_is_fine(signal: Validator) -> None:
    assert signal.check(b"\n  " + _raw(VALID) + b"  \r\n") == VALID


# --- object schema -------------------------------------------------------------------------------


@pytest.mark.parametrize("obj", [{}, {"value": "not a number"}, {"name": ""}, {"a": [1, {}]},
                                 {"value": True, "timestamp": "2024-05-01T12:00:00"}])
def test_object_schema_accepts_any_object(obj: dict[str, Any]) -> None:
    v = Validator("object", MAX)
    assert v.struct is None
    assert v.check(_raw(obj)) == obj


# --- module:Struct schema ------------------------------------------------------------------------


def test_custom_struct_schema() -> None:
    from tests.schemas import Reading

    v = Validator("tests.schemas:Reading", MAX)
    assert v.struct is Reading
    obj = {"sensor": "t1", "reading": 21, "where": {"room": "lab"}}
    assert v.check(_raw(obj)) == obj
    assert v.check(_raw({**obj, "unit": "F"}))["unit"] == "F"
    assert "$.reading" in _refused(v, _raw({"sensor": "t1", "reading": "hot"}), SCHEMA).detail
    assert "reading" in _refused(v, _raw({"sensor": "t1"}), SCHEMA).detail
    assert "$.sensor" in _refused(v, _raw({"sensor": "", "reading": 1}), SCHEMA).detail
    # the signal schema's rules do not apply to a custom schema
    assert v.check(_raw({"sensor": "t1", "reading": 1, "value": "x"}))["value"] == "x"


@pytest.mark.parametrize("name", [
    "tests.no_such_module:Reading",
    "no_such_package.mod:Reading",
    "tests.schemas:Missing",
    "tests.schemas:NotAStruct",
    "tests.schemas:NOT_A_TYPE",
    "json:loads",
    "tests.schemas",
])
def test_bad_schema_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        Validator(name, MAX)
    assert str(info.value).startswith("schema: ")
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("source", ["raise RuntimeError('boom')", "x = ("])
def test_schema_module_that_fails_to_import_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    module = f"broken_schema_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(source) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=module):
        Validator(f"{module}:Signal", MAX)


def test_load_struct_names() -> None:
    assert schema.load_struct("signal") is schema.Signal
    assert schema.load_struct("object") is None


# --- fuzz: nothing but RecordError ever escapes ---------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)
# objects that look like signals, with any JSON in any field, so the schema path is exercised
_likely = ["x", 1.5, "2024-05-01T12:00:00Z", "2024-05-01T12:00:00", {}, {"k": "v"}]
_near_signals = st.fixed_dictionaries({}, optional={
    k: _json | st.sampled_from([VALID.get(k, "x"), *_likely])
    for k in ("name", "value", "source", "timestamp", "id", "tags")
}).flatmap(lambda d: st.builds(lambda extra: {**extra, **d},
                               st.dictionaries(st.text(max_size=8), _json, max_size=3)))

VALIDATORS = [Validator("signal", 4096), Validator("object", 4096),
              Validator("tests.schemas:Reading", 4096)]
_fuzz = settings(max_examples=500, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _check_never_raises_else(raw: bytes | None) -> None:
    for v in VALIDATORS:
        try:
            obj = v.check(raw)
        except RecordError as err:
            assert err.reason in schema.REASONS
            assert 0 < len(err.detail) <= schema.DETAIL_MAX
            continue
        assert type(obj) is dict
        assert raw is not None
        assert obj == json.loads(raw)  # what the Celery worker will decode from the same bytes


@_fuzz
@given(raw=st.binary(max_size=5000) | st.none())
def test_fuzz_arbitrary_bytes(raw: bytes | None) -> None:
    _check_never_raises_else(raw)


@_fuzz
@given(value=_json | _near_signals)
def test_fuzz_arbitrary_json(value: Any) -> None:
    _check_never_raises_else(orjson.dumps(value))


@_fuzz
@given(value=_json | _near_signals, cut=st.integers(0, 200), junk=st.binary(max_size=3))
def test_fuzz_mangled_json(value: Any, cut: int, junk: bytes) -> None:
    raw = orjson.dumps(value)
    _check_never_raises_else(raw[: len(raw) - cut] + junk)


# --- items: memory per record is bounded before decoding ------------------------


def _items(obj: Any) -> int:
    """Containers plus their elements, counted on the decoded object."""
    if type(obj) is dict:
        return 1 + len(obj) + sum(_items(v) for v in obj.values())
    if type(obj) is list:
        return 1 + len(obj) + sum(_items(v) for v in obj)
    return 0


@given(_json)
def test_items_counted_on_the_bytes_equal_the_decoded_objects_items(obj: Any) -> None:
    for raw in (orjson.dumps(obj), json.dumps(obj, indent=1).encode()):
        assert count_items(raw) == _items(obj), raw
        # Why a short record is not counted at all: an item takes at least a byte, and
        # a level of nesting two.
        assert count_items(raw) <= len(raw) and _depth(obj) * 2 <= len(raw)


def _depth(obj: Any) -> int:
    if type(obj) is dict:
        return 1 + max(map(_depth, obj.values()), default=0)
    if type(obj) is list:
        return 1 + max(map(_depth, obj), default=0)
    return 0


def test_a_short_record_is_refused_by_a_low_item_limit_all_the_same() -> None:
    v = Validator("signal", MAX, max_record_items=5)
    raw = b'{"name": "n", "value": 1, "source": "s", "timestamp": 1, "x": [1]}'
    assert _refused(v, raw, TOO_LARGE).detail == "8 JSON items > 5"


def test_a_record_over_the_item_limit_is_too_large_before_it_is_decoded() -> None:
    head = b'{"name": "n", "value": 1, "source": "s", "timestamp": 1, "x": ['
    v = Validator("signal", MAX, max_record_items=1000)
    at_limit = head + b",".join([b"[]"] * 498) + b"]}"  # 1 + 5 + 1 + 498 * 2 = 1003
    assert count_items(at_limit) == 1003
    err = _refused(v, at_limit, TOO_LARGE)
    assert err.detail == "1003 JSON items > 1000"
    under = head + b",".join([b"[]"] * 496) + b"]}"
    assert v.check(under)["x"] == [[]] * 496
    # Commas and brackets inside strings are no items.
    text = b'{"name": "n", "value": 1, "source": "' + b"[a, {b}], " * 1000 + b'", "timestamp": 1}'
    assert count_items(text) == 5 and v.check(text)["name"] == "n"
