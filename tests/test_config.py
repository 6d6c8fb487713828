"""config.load: precedence, every bad-config case, and secret redaction.

Every call passes ``argv`` and ``environ`` explicitly, so the process environment
and command line of the test run never leak in.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from ingestd import config
from ingestd.config import Config, Loaded
from ingestd.errors import ConfigError
from tests.rdkafka_conf import sensitive_properties

TomlWriter = Callable[..., str]


def _toml_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for these plain values
    return repr(value)


@pytest.fixture
def toml(tmp_path: Path) -> TomlWriter:
    """Writes a TOML file from keyword values (or raw text) and returns its path."""
    counter = iter(range(1000))

    def write(text: str | None = None, **values: Any) -> str:
        path = tmp_path / f"ingestd-{next(counter)}.toml"
        body = text if text is not None else "".join(
            f"{key} = {_toml_value(v)}\n" for key, v in values.items())
        path.write_text(body)
        return str(path)

    return write


def load(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Loaded:
    return config.load(list(argv), dict(environ or {}))


# --- defaults and precedence ----------


def test_defaults() -> None:
    loaded = load()
    c = loaded.config
    assert set(loaded.sources.values()) == {"default"}
    assert set(loaded.sources) == {f.name for f in config.SETTINGS}
    assert c.workers == (os.cpu_count() or 1)
    assert c.topic == ("pulse_signals",)
    assert c.bootstrap_servers == "localhost:9092"
    assert c.group_id == "pulse_ingest_group"
    assert c.assignment == "group"
    assert c.instance_id == socket.gethostname()
    assert c.broker_url == "redis://localhost:6379/0"
    assert c.task == "ingest_and_score_signal"
    assert c.queue == "celery"
    assert c.dispatch == "each"
    assert c.batch_task == "ingest_and_score_signals"
    assert c.schema == "signal"
    assert c.dead_letter_topic == "pulse_signals.dlq"
    assert (c.batch_size, c.batch_timeout_ms) == (1000, 50)
    assert c.max_record_bytes == 1048576
    assert c.max_queue_depth == 0
    assert c.metrics_addr == "127.0.0.1:9102"
    assert c.drain_timeout == 30.0
    assert c.kafka_property == ()
    assert (c.log_format, c.log_level) == ("text", "INFO")
    assert loaded.check is False
    assert loaded.config_file is None


def test_process_environment_is_not_read_when_environ_is_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTD_WORKERS", "7")
    monkeypatch.setenv("KAFKA_TOPIC", "from-process-env")
    loaded = load(environ={})
    assert set(loaded.sources.values()) == {"default"}
    assert loaded.config.topic == ("pulse_signals",)


# (setting, flag argv, INGESTD_ env value, TOML value, old variable, old value, expected values
#  in order flag / env / file / old variable / default)
LAYERED = [
    ("topic", ["--topic", "f1", "--topic", "f2"], "e1,e2", ["t1", "t2"], "KAFKA_TOPIC", "l1, l2",
     [("f1", "f2"), ("e1", "e2"), ("t1", "t2"), ("l1", "l2"), ("pulse_signals",)]),
    ("bootstrap_servers", ["--bootstrap-servers", "flag:9092"], "env:9092", "file:9092",
     "KAFKA_BOOTSTRAP", "old:9092",
     ["flag:9092", "env:9092", "file:9092", "old:9092", "localhost:9092"]),
    ("group_id", ["--group-id", "g-flag"], "g-env", "g-file", "KAFKA_GROUP", "g-old",
     ["g-flag", "g-env", "g-file", "g-old", "pulse_ingest_group"]),
    ("broker_url", ["--broker-url", "redis://flag:6379/1"], "redis://env:6379/2",
     "amqp://file:5672//", "CELERY_BROKER_URL", "redis://old:6379/4",
     ["redis://flag:6379/1", "redis://env:6379/2", "amqp://file:5672//", "redis://old:6379/4",
      "redis://localhost:6379/0"]),
    ("workers", ["--workers", "3"], "5", 7, None, None, [3, 5, 7, None, None]),
    ("drain_timeout", ["--drain-timeout", "1.5"], "2", 3, None, None, [1.5, 2.0, 3.0, None, 30.0]),
]


@pytest.mark.parametrize(("name", "flag", "env_value", "file_value", "old_var", "old_value",
                          "expected"), LAYERED, ids=[row[0] for row in LAYERED])
def test_precedence(toml: TomlWriter, name: str, flag: list[str], env_value: str,
                    file_value: Any, old_var: str | None, old_value: str | None,
                    expected: list[Any]) -> None:
    """flag > INGESTD_* env > --config TOML > the old script's variable > default."""
    env_var = "INGESTD_" + name.upper()
    path = toml(**{name: file_value})
    layers: list[tuple[str, list[str], dict[str, str]]] = [
        ("flag", flag, {}),
        ("env", [], {env_var: env_value}),
        ("file", ["--config", path], {}),
        (f"env {old_var}", [], {old_var: old_value} if old_var and old_value else {}),
    ]
    for top, want in enumerate(expected):
        if want is None and top < len(layers):
            continue  # this setting has no old variable
        argv: list[str] = []
        environ: dict[str, str] = {}
        for _, layer_argv, layer_env in layers[top:]:
            argv += layer_argv
            environ.update(layer_env)
        loaded = load(argv, environ)
        source = layers[top][0] if top < len(layers) else "default"
        if want is None:  # the default is computed (workers: CPU count)
            assert loaded.sources[name] == "default"
            continue
        assert getattr(loaded.config, name) == want, (top, argv, environ)
        assert loaded.sources[name] == source, (top, argv, environ)


def test_hyphenated_toml_keys_and_toml_types(toml: TomlWriter) -> None:
    path = toml('batch-size = 10\nbatch_timeout_ms = 0\ndrain-timeout = 5\nlog_level = "debug"\n'
                'dlq_topic = ""\nkafka-property = ["fetch.min.bytes=1", "client.id=x=y"]\n'
                'dispatch = "batch"\nmax_queue_depth = 100\n')
    c = load(["--config", path]).config
    assert c.batch_size == 10
    assert c.batch_timeout_ms == 0
    assert c.drain_timeout == 5.0 and isinstance(c.drain_timeout, float)
    assert c.log_level == "DEBUG"
    assert c.dlq_topic == "" and c.dead_letter_topic == ""  # "" disables dead-lettering
    assert c.kafka_properties == {"fetch.min.bytes": "1", "client.id": "x=y"}
    assert c.dispatch == "batch"
    assert c.max_queue_depth == 100


def test_config_flag_beats_ingestd_config_env(toml: TomlWriter) -> None:
    by_flag, by_env = toml(queue="from-flag-file"), toml(queue="from-env-file")
    loaded = load(["--config", by_flag], {"INGESTD_CONFIG": by_env})
    assert loaded.config.queue == "from-flag-file"
    assert loaded.config_file == by_flag
    loaded = load([], {"INGESTD_CONFIG": by_env})
    assert loaded.config.queue == "from-env-file"
    assert loaded.sources["queue"] == "file"
    assert loaded.config_file == by_env


def test_repeatable_and_comma_separated_topics() -> None:
    assert load(environ={"INGESTD_TOPIC": " a, b,,c "}).config.topic == ("a", "b", "c")
    assert load(["--topic", "a", "--topic", "b"]).config.topic == ("a", "b")
    assert load(["--topic", "x"], {"INGESTD_TOPIC": "a,b"}).config.topic == ("x",)
    assert load(["--topic", "x", "--topic", "y"]).config.dead_letter_topic == "x.dlq"


def test_check_flag_and_derived_properties() -> None:
    loaded = load(["--check", "--broker-url", "amqp://guest:guest@h:5672//", "-X", "a=1",
                   "-X", "b=c=d", "--dlq-topic", "dead"])
    assert loaded.check is True
    assert loaded.config.broker_is_redis is False
    assert loaded.config.kafka_properties == {"a": "1", "b": "c=d"}
    assert loaded.config.dead_letter_topic == "dead"
    assert load(["--broker-url", "rediss://h:6380/0"]).config.broker_is_redis is True


def test_log_level_is_case_insensitive_in_env_and_file(toml: TomlWriter) -> None:
    assert load(environ={"INGESTD_LOG_LEVEL": "warning"}).config.log_level == "WARNING"
    assert load(["--config", toml(log_level="error")]).config.log_level == "ERROR"


def test_log_level_is_case_insensitive_as_a_flag() -> None:
    assert load(["--log-level", "debug"]).config.log_level == "DEBUG"


def test_kafka_property_values_with_commas_from_env() -> None:
    c = load(environ={"INGESTD_KAFKA_PROPERTY": "debug=consumer,cgrp,fetch,client.id=x"}).config
    assert c.kafka_properties == {"debug": "consumer,cgrp,fetch", "client.id": "x"}


def test_an_environment_list_as_a_json_array_holds_any_text() -> None:
    env = {"INGESTD_KAFKA_PROPERTY": '["sasl.oauthbearer.extensions=a=1,b=2", '
                                     '"sasl.password=p,X=q"]',
           "INGESTD_TOPIC": '["a", "b"]'}
    loaded = load([], env)
    assert loaded.config.kafka_properties == {"sasl.oauthbearer.extensions": "a=1,b=2",
                                              "sasl.password": "p,X=q"}
    assert loaded.config.topic == ("a", "b")
    with pytest.raises(ConfigError, match=r"kafka-property \(from INGESTD_KAFKA_PROPERTY\): "
                                          "not a JSON array"):
        load([], {"INGESTD_KAFKA_PROPERTY": '["a=1",'})
    with pytest.raises(ConfigError, match="expected a list of strings, got a int in it"):
        load([], {"INGESTD_KAFKA_PROPERTY": "[1]"})


def test_kafka_properties_merge_key_by_key_file_then_env_then_flags(toml: TomlWriter) -> None:
    """The README's secrets-in-ingestd.env pattern: the file's tuning stays."""
    path = toml(kafka_property=["a=file", "fetch.max.bytes=1000"])
    loaded = load(["--config", path, "-X", "a=flag"],
                  {"INGESTD_KAFKA_PROPERTY": "a=env,sasl.password=s3cret"})
    assert loaded.config.kafka_property == ("a=flag", "fetch.max.bytes=1000",
                                            "sasl.password=s3cret")
    assert loaded.sources["kafka_property"] == "file+env+flag"
    assert load(["--config", path]).sources["kafka_property"] == "file"
    assert load([]).sources["kafka_property"] == "default"


def test_a_url_password_inside_any_kafka_property_is_hidden() -> None:
    loaded = load(["-X", "sasl.oauthbearer.token.endpoint.url=https://cid:s3cret@idp/token"])
    text = "\n".join(config.describe(loaded)) + config.summary(loaded.config)
    assert "s3cret" not in text and "https://cid:***@idp/token" in text


# --- bad configuration: ConfigError naming the setting and the bad value ----------

BAD_ARGS = [
    # (argv, environ, words the message must contain)
    (["--workers", "0"], {}, ["workers", "0"]),
    (["--workers=-1"], {}, ["workers", "-1"]),
    (["--workers", "two"], {}, ["workers", "'two'"]),
    ([], {"INGESTD_WORKERS": "0"}, ["workers", "INGESTD_WORKERS", "0"]),
    ([], {"INGESTD_WORKERS": "1.5"}, ["workers", "INGESTD_WORKERS", "'1.5'"]),
    (["--batch-size", "0"], {}, ["batch-size", "0"]),
    (["--max-record-bytes", "-5"], {}, ["max-record-bytes", "-5"]),
    (["--max-queue-depth", "-1"], {}, ["max-queue-depth", "-1"]),
    (["--batch-timeout-ms", "soon"], {}, ["batch-timeout-ms", "'soon'"]),
    (["--drain-timeout", "-1"], {}, ["drain-timeout", "-1"]),
    (["--drain-timeout", "forever"], {}, ["drain-timeout", "'forever'"]),
    (["--broker-url", "http://broker:80/0"], {}, ["broker-url", "http://broker:80/0"]),
    (["--broker-url", "localhost:6379"], {}, ["broker-url", "localhost:6379"]),
    (["--broker-url", ""], {}, ["broker-url", "''"]),
    (["--broker-url", "redis://host:port/0"], {}, ["broker-url", "redis://host:port/0"]),
    ([], {"INGESTD_BROKER_URL": "mqtt://h"}, ["broker-url", "INGESTD_BROKER_URL", "mqtt://h"]),
    ([], {"CELERY_BROKER_URL": "sqs://h"}, ["broker-url", "CELERY_BROKER_URL", "sqs://h"]),
    (["-X", "foo"], {}, ["kafka-property", "'foo'"]),
    (["-X", "=value"], {}, ["kafka-property", "'=value'"]),
    (["-X", "a=1", "-X", "fetch.max.bytes"], {}, ["kafka-property", "'fetch.max.bytes'"]),
    ([], {"INGESTD_KAFKA_PROPERTY": "oops,a=1"}, ["kafka-property", "'oops'"]),
    (["-X"], {}, ["-X"]),
    (["--nope"], {}, ["--nope"]),
    (["--work", "2"], {}, ["--work"]),  # no abbreviations
    (["--workers"], {}, ["--workers"]),
    (["positional"], {}, ["positional"]),
    (["--dispatch", "some"], {}, ["dispatch", "'some'"]),
    (["--assignment", "random"], {}, ["assignment", "'random'"]),
    (["--log-format", "xml"], {}, ["log-format", "'xml'"]),
    ([], {"INGESTD_LOG_LEVEL": "verbose"}, ["log-level", "'VERBOSE'"]),
    ([], {"INGESTD_DISPATCH": "all"}, ["dispatch", "'all'"]),
    (["--schema", "not a schema"], {}, ["schema", "'not a schema'"]),
    (["--metrics-addr", "9102"], {}, ["metrics-addr", "'9102'"]),
    (["--metrics-addr", "host:http"], {}, ["metrics-addr", "'host:http'"]),
    (["--topic", ""], {}, ["topic"]),
    ([], {"INGESTD_TOPIC": " , "}, ["topic"]),
    (["--config", "/nonexistent/ingestd.toml"], {}, ["config", "/nonexistent/ingestd.toml"]),
]


def _assert_config_error(argv: Sequence[str], environ: Mapping[str, str],
                         words: Sequence[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(argv, environ)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert "\n" not in message  # one clear line
    assert info.value.exit_code == 2
    return info.value


@pytest.mark.parametrize(("argv", "environ", "words"), BAD_ARGS,
                         ids=[" ".join(a) + " ".join(f"{k}={v}" for k, v in e.items())
                              for a, e, _ in BAD_ARGS])
def test_bad_flag_or_env(argv: list[str], environ: dict[str, str], words: list[str]) -> None:
    _assert_config_error(argv, environ, words)


BAD_TOML = [
    # (TOML text, words the message must contain besides the file name)
    ("workers = 0\n", ["workers", "0"]),
    ("workers = 1.5\n", ["workers", "1.5"]),
    ("workers = true\n", ["workers", "True"]),
    ('workers = "four"\n', ["workers", "'four'"]),
    ("workers = 2024-01-01\n", ["workers", "2024"]),
    ("workers = [1]\n", ["workers", "[1]"]),
    ("topic = 5\n", ["topic", "5"]),
    ("topic = [1, 2]\n", ["topic", "expected a list of strings"]),
    ("drain_timeout = true\n", ["drain-timeout", "True"]),
    ('drain_timeout = "later"\n', ["drain-timeout", "'later'"]),
    ("log_level = 3\n", ["log-level", "3"]),
    ('log_level = "loud"\n', ["log-level", "'LOUD'"]),
    ("dlq_topic = 5\n", ["dlq-topic", "5"]),
    ('queue = ["a"]\n', ["queue", "['a']"]),
    ("kafka_property = {a = 1}\n", ["kafka-property", "expected a list of strings"]),
    ('kafka_property = ["nokey"]\n', ["kafka-property", "'nokey'"]),
    ('broker_url = "http://h"\n', ["broker-url", "'http://h'"]),
    ('dispatch = "nope"\n', ["dispatch", "'nope'"]),
    ("bogus = 1\n", ["unknown key", "'bogus'"]),
    ("check = true\n", ["unknown key", "'check'"]),
    ("[kafka]\nbootstrap = 1\n", ["unknown key", "'kafka'"]),
    ("workers = \n", ["TOML syntax error"]),
    ('queue = "unterminated\n', ["TOML syntax error"]),
    ("workers = 1\nworkers = 2\n", ["TOML syntax error"]),
]


@pytest.mark.parametrize(("text", "words"), BAD_TOML, ids=[t.strip() for t, _ in BAD_TOML])
def test_bad_toml(toml: TomlWriter, text: str, words: list[str]) -> None:
    path = toml(text)
    _assert_config_error(["--config", path], {}, [path, *words])


def test_empty_topic_list_in_toml(toml: TomlWriter) -> None:
    _assert_config_error(["--config", toml("topic = []\n")], {}, ["topic"])


# --- secrets are redacted ----------

SECRETS = ["hunter2", "k3y-pass", "oauth-s3cret", "store-pw", "Shh-UPPER", "url-pa55"]
SECRET_PROPS = [
    "sasl.password=hunter2",
    "ssl.key.password=k3y-pass",
    "sasl.oauthbearer.client.secret=oauth-s3cret",
    "ssl.keystore.password=store-pw",
    "My.Custom.SECRET=Shh-UPPER",
    "sasl.username=alice",  # librdkafka treats it as sensitive too
]
PLAIN_PROPS = ["security.protocol=SASL_SSL", "sasl.mechanism=PLAIN", "fetch.wait.max.ms=100"]


def _all_text(loaded: Loaded) -> str:
    return "\n".join(config.describe(loaded)) + "\n" + config.summary(loaded.config)


def _assert_redacted(loaded: Loaded) -> None:
    text = _all_text(loaded)
    for secret in SECRETS:
        assert secret not in text, secret
    for prop in PLAIN_PROPS:
        assert prop in text
    for prop in SECRET_PROPS:
        assert prop.split("=", 1)[0] + "=***" in text
    assert "amqp://alice:***@rabbit:5672/vhost" in text
    # the real values are still what ingestd uses
    assert loaded.config.kafka_properties["sasl.password"] == "hunter2"
    assert loaded.config.broker_url == "amqp://alice:url-pa55@rabbit:5672/vhost"


def test_secrets_redacted_from_flags() -> None:
    argv = ["--broker-url", "amqp://alice:url-pa55@rabbit:5672/vhost"]
    for prop in SECRET_PROPS + PLAIN_PROPS:
        argv += ["-X", prop]
    _assert_redacted(load(argv))


def test_secrets_redacted_from_env() -> None:
    _assert_redacted(load(environ={
        "CELERY_BROKER_URL": "amqp://alice:url-pa55@rabbit:5672/vhost",
        "INGESTD_KAFKA_PROPERTY": ",".join(SECRET_PROPS + PLAIN_PROPS)}))


def test_secrets_redacted_from_toml(toml: TomlWriter) -> None:
    path = toml(broker_url="amqp://alice:url-pa55@rabbit:5672/vhost",
                kafka_property=SECRET_PROPS + PLAIN_PROPS)
    _assert_redacted(load(["--config", path]))


def test_describe_lists_every_setting_with_its_source(toml: TomlWriter) -> None:
    loaded = load(["--workers", "2", "--config", toml(queue="q")],
                  {"INGESTD_TOPIC": "t", "CELERY_BROKER_URL": "redis://:pw0rd@h:6379/3"})
    lines = config.describe(loaded)
    assert len(lines) == len(config.SETTINGS)
    by_name = {line.split()[0]: line for line in lines}
    assert by_name["workers"].endswith("(flag)") and "= 2" in by_name["workers"]
    assert by_name["topic"].endswith("(env)")
    assert by_name["queue"].endswith("(file)")
    assert by_name["broker_url"].endswith("(env CELERY_BROKER_URL)")  # the old script's
    assert "pw0rd" not in "\n".join(lines)
    assert "redis://:***@h:6379/3" in by_name["broker_url"]
    assert by_name["task"].endswith("(default)")


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://user:pw@h:6379/0", "redis://user:***@h:6379/0"),
    ("rediss://user:p%40ss%2Fword@h:6380/1", "rediss://user:***@h:6380/1"),
    ("amqp://guest:guest@localhost:5672//", "amqp://guest:***@localhost:5672//"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("redis://user@h:6379/0", "redis://user@h:6379/0"),
    ("amqp://u:pw1@h1:5672//;amqp://u:pw2@h2:5672//", "amqp://u:***@h1:5672//;amqp://u:***@h2:5672//"),
    ("redis://:pa;ss@h:6379/0", "redis://:***@h:6379/0"),  # ";" in a password splits nothing
])
def test_redact_url(url: str, shown: str) -> None:
    assert config.redact_url(url) == shown
    assert config.shown("broker_url", url) == shown
    assert config.summary(Config(broker_url=url)).count(shown) == 1


def test_redact_text_hides_url_passwords() -> None:
    text = "Error 111 connecting to redis://u:pw1@h:6379/0; also amqp://guest:pw2@x//"
    out = config.redact(text)
    assert "pw1" not in out and "pw2" not in out
    assert "redis://u:***@h:6379/0" in out and "amqp://guest:***@x//" in out


@pytest.mark.parametrize("argv", [
    ["--broker-url", "http://alice:url-pa55@h/0"],
    ["--broker-url", "redis://alice:url-pa55@h:port/0"],
    ["-X", "sasl.password=url-pa55", "--workers", "0"],
])
def test_config_errors_do_not_leak_secrets(argv: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(argv)
    assert "url-pa55" not in str(info.value)


@pytest.mark.parametrize("text", ['kafka_property = ["sasl.password=url-pa55", 1]\n',
                                  '[kafka_property]\nsasl.password = "url-pa55"\n'])
def test_bad_kafka_property_list_does_not_leak_secrets(toml: TomlWriter, text: str) -> None:
    path = toml(text)
    with pytest.raises(ConfigError) as info:
        load(["--config", path])
    assert "url-pa55" not in str(info.value)


def test_every_property_librdkafka_treats_as_sensitive_is_sensitive_here() -> None:
    """librdkafka's own list, read from the library itself (``tests/rdkafka_conf.py``)."""
    theirs = sensitive_properties()
    assert {"sasl.username", "sasl.password", "ssl.key.password", "ssl.key.pem",
            "ssl.ca.pem"} <= theirs  # the walk itself works
    assert {key for key in theirs if not config.sensitive(key)} == set()
    for key in theirs | config.SENSITIVE_PROPERTIES:
        assert config.redact_property(f"{key}=x=y") == f"{key}=***"
        assert config.redact_values(f"bad value x=y for {key}", {key: "x=y"}) == \
            f"bad value *** for {key}"


def test_every_protected_property_is_refused() -> None:
    for key in config.PROTECTED_PROPERTIES:
        with pytest.raises(ConfigError, match=f"any property but {re.escape(key)} "):
            load(["-X", f" {key} =true"], {})
    assert load(["-X", "enable.partition.eof=true"], {}).config.kafka_properties == {
        "enable.partition.eof": "true"}


def test_starting_at_the_end_is_an_option_of_its_own() -> None:
    from ingestd.kafka import consumer_config

    assert consumer_config(load([], {}).config, 0)["auto.offset.reset"] == "earliest"
    latest = load(["--offset-reset", "latest"], {}).config
    assert consumer_config(latest, 0)["auto.offset.reset"] == "latest"
    with pytest.raises(ConfigError, match="use --offset-reset"):
        load(["-X", "auto.offset.reset=latest"], {})


def test_queue_type_is_rabbitmqs() -> None:
    amqp = ["--broker-url", "amqp://guest:guest@localhost:5672//"]
    assert load(amqp).config.queue_type == "classic"
    assert load([*amqp, "--queue-type", "quorum"]).config.queue_type == "quorum"
    assert load(amqp, {"INGESTD_QUEUE_TYPE": "quorum"}).config.queue_type == "quorum"
    with pytest.raises(ConfigError, match="queue-type: quorum queues are RabbitMQ's"):
        load(["--queue-type", "quorum"])
    with pytest.raises(ConfigError, match="queue-type"):
        load([*amqp, "--queue-type", "stream"])


def test_a_failover_list_of_amqp_urls() -> None:
    from ingestd.celery import tls

    urls = "amqp://u:p@h1:5672//; amqp://u:p@h2:5673//"
    loaded = load(["--broker-url", urls]).config
    assert config.broker_urls(loaded.broker_url) == ["amqp://u:p@h1:5672//",
                                                     "amqp://u:p@h2:5673//"]
    assert not loaded.broker_is_redis
    assert tls.resolve(loaded) == ("amqp://u:p@h1:5672//;amqp://u:p@h2:5673//", None)
    secure = Config(broker_url="amqps://h1:5671//?ssl_ca_certs=/ca.pem;amqps://h2:5671//")
    url, verified = tls.resolve(secure)
    assert url == "amqps://h1:5671//;amqps://h2:5671//"
    assert verified is not None and verified.ca == "/ca.pem" and verified.verify
    for bad, expected in [
            ("redis://h1:6379/0;redis://h2:6379/0", "a failover list"),
            ("amqp://h1//;redis://h2:6379/0", "a failover list"),
            ("amqp://h1//;amqp://h2:x//", "a numeric port")]:
        with pytest.raises(ConfigError, match=expected):
            load(["--broker-url", bad])
    for bad, expected in [("amqps://h1//;amqp://h2//", "uses TLS"),
                          ("amqps://h1//?ssl_ca_certs=/a;amqps://h2//?ssl_ca_certs=/b",
                           "different TLS")]:
        with pytest.raises(ConfigError, match=expected):
            tls.resolve(Config(broker_url=bad))


def test_redis_sentinel_urls_and_master_name() -> None:
    urls = "sentinel://:pw@h1:26379/3;sentinel://:pw@h2:26379/3"
    loaded = load(["--broker-url", urls, "--broker-master-name", "prod",
                   "--broker-min-replicas", "1"]).config
    assert loaded.broker_is_redis and loaded.broker_is_sentinel
    assert (loaded.broker_master_name, loaded.broker_min_replicas) == ("prod", 1)
    assert config.redact_url(urls) == "sentinel://:***@h1:26379/3;sentinel://:***@h2:26379/3"
    env = {"INGESTD_BROKER_URL": urls, "INGESTD_BROKER_MASTER_NAME": "prod"}
    assert load([], env).config.broker_master_name == "prod"
    assert load(["--broker-min-replicas", "2"]).config.broker_min_replicas == 2  # plain Redis
    for argv, expected in [
            (["--broker-url", urls], "broker-master-name: expected the name"),
            (["--broker-master-name", "prod"], "only for sentinel://"),
            (["--broker-url", "amqp://h//", "--broker-min-replicas", "1"], "quorum queues"),
            (["--broker-url", "sentinel://h1:26379;redis://h2:6379"], "Redis Sentinel"),
            (["--broker-url", urls, "--broker-master-name", "p", "--broker-tls-insecure"],
             "not offered with sentinel"),
            (["--broker-min-replicas", "-1"], "a number >= 0")]:
        with pytest.raises(ConfigError, match=expected):
            load(argv, {})


def test_schema_registry_settings(tmp_path: Path) -> None:
    url = "https://u:pw@registry:8443/apis/ccompat/v7"
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    loaded = load(["--value-format", "registry-avro", "--schema-registry-url", url,
                   "--schema-registry-tls-ca", str(ca)], {}).config
    assert (loaded.value_format, loaded.schema_registry_tls_ca) == ("registry-avro", str(ca))
    assert config.shown("schema_registry_url", url) == \
        "https://u:***@registry:8443/apis/ccompat/v7"
    env = {"INGESTD_VALUE_FORMAT": "registry-protobuf", "INGESTD_SCHEMA_REGISTRY_URL": url}
    assert load([], env).config.value_format == "registry-protobuf"
    for argv, expected in [
            (["--value-format", "registry-json"], "expected the registry's URL"),
            (["--schema-registry-url", url], "only for --value-format registry-json"),
            (["--value-format", "avro"], "invalid choice"),
            (["--value-format", "registry-json", "--schema-registry-url", "ftp://r"],
             "an http://, https://"),
            (["--value-format", "registry-json", "--schema-registry-url", "http://r",
              "--schema-registry-tls-ca", str(ca)], "only for an https://"),
            (["--value-format", "registry-json", "--schema-registry-url", url,
              "--schema-registry-tls-key", str(ca)], "the key of a client certificate")]:
        with pytest.raises(ConfigError, match=expected):
            load(argv, {})


def test_share_group_type() -> None:
    """--group-type share: a group of its own kind; the consumer settings it has no use
    for are refused, and so are the share consumer's settings a classic one would get."""
    from ingestd import kafka

    loaded = load(["--group-type", "share"]).config
    assert loaded.group_type == "share"
    assert load([], {"INGESTD_GROUP_TYPE": "share"}).config.group_type == "share"
    props = kafka.share_consumer_config(loaded, 3)
    assert props["share.acknowledgement.mode"] == "explicit"
    assert not {"group.instance.id", "session.timeout.ms", "enable.auto.commit",
                "partition.assignment.strategy", "auto.offset.reset"} & set(props)
    kafka.check_properties(props, share=True)
    for argv, expected in [
            (["--group-type", "share", "--assignment", "static"], "not with --assignment"),
            (["--group-type", "share", "--group-protocol", "consumer"],
             "only for --group-type classic"),
            (["--group-type", "queue"], "group-type")]:
        with pytest.raises(ConfigError, match=expected):
            load(argv, {})
    with pytest.raises(ConfigError, match=r"session\.timeout\.ms"):
        kafka.check_properties(kafka.share_consumer_config(
            load(["--group-type", "share", "-X", "session.timeout.ms=6000"]).config, 0),
            share=True)
