"""The ``ingestd`` command end to end: real processes against the real local stack.

Bad configuration exits 2 with one line; ``--check`` reaches Kafka and the
Celery broker; secrets never reach any output; JSON logs; ``/metrics``,
``/healthz`` and ``/readyz`` of a running supervisor.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ingestd import config
from tests import stack
from tests.rdkafka_conf import sensitive_properties

if TYPE_CHECKING:
    from tests.conftest import PrivateRedis

pytestmark = pytest.mark.stack

SECRET = "s3cr3t-planted"
# Every setting's environment variable, the old script's ones, and the metrics
# folder (ingestd wipes it): none may leak in from the test run's environment.
OWN_ENV = ({config.env_of(f) for f in config.SETTINGS}
           | {spec.legacy_env for spec in map(config.spec_of, config.SETTINGS) if spec.legacy_env}
           | {"INGESTD_CONFIG", "PROMETHEUS_MULTIPROC_DIR"})
LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
TASK = "ingest_and_score_signal"
# One record per dead-letter category, with --max-record-bytes 30000.
INVALID: dict[bytes, str] = {
    b"\xff\xfe not utf-8": "decode",
    b'{"name": "x", "value": 1,': "decode",
    b'[{"name": "n"}]': "not_object",
    b"null": "not_object",
    b'{"name": "", "value": 1, "source": "s", "timestamp": 1}': "schema",
    b'{"name": "n", "value": 1, "source": "s"}': "schema",
    b'{"name": "n", "value": 1, "source": "s", "timestamp": 1, "pad": "' + b"x" * 40_000 + b'"}':
        "too_large",
}
MAX_RECORD_BYTES = "30000"


# --- helpers --------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OWN_ENV}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``python -m ingestd ARGS`` to completion, stdout and stderr apart."""
    return subprocess.run([sys.executable, "-m", "ingestd", *args], capture_output=True,
                          text=True, env=clean_env(**(env or {})), cwd=stack.REPO,
                          timeout=timeout)


class Ingestd(stack.Ingestd):
    """``stack.Ingestd`` with stdout and stderr in files of their own and a clean
    environment (nothing from the test run's ``INGESTD_*``)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(*args)
        self.env = clean_env(**(env or {}))
        self.err = self.log.with_suffix(".err")

    def start(self) -> Ingestd:
        with self.log.open("ab") as out, self.err.open("ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "ingestd", *self.args],
                                         stdout=out, stderr=err, env=self.env, cwd=stack.REPO)
        return self

    def stdout(self) -> str:
        return self.log.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def __enter__(self) -> Ingestd:
        return self.start()





Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str) -> Samples:
    status, body = stack.http_get(f"{base}/metrics")
    assert status == 200, (status, body)
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def queue_len(broker_url: str) -> int:
    return int(redis.Redis.from_url(broker_url).llen("celery"))


def closed_port() -> int:
    """A loopback port nothing listens on."""
    return stack.free_port()


def stop(ingestd: Ingestd, timeout: float = 60) -> None:
    ingestd.signal(signal.SIGTERM)
    assert ingestd.wait(timeout) == 0, ingestd.output()[-3000:]


# --- 1. bad configuration -------------------------------------------------

# A safe setting for any configuration that would wrongly be accepted: a --check
# against a topic that does not exist exits 1 at once, and never runs workers.
SAFE = ("--check", "--bootstrap-servers", stack.BOOTSTRAP, "--topic", "no-such-topic-for-cli",
        "--broker-url", "redis://127.0.0.1:1/0")

BAD_ARGS = [
    # (arguments, words the one line must contain)
    (["--no-such-flag"], ["unrecognized arguments", "--no-such-flag"]),
    (["--workers", "0"], ["workers", "bad value 0", "expected a whole number >= 1"]),
    (["--batch-size", "x"], ["batch-size", "'x'", "expected a whole number"]),
    (["--broker-url", "http://x"], ["broker-url", "'http://x'", "redis://"]),
    (["-X", "foo"], ["kafka-property", "'foo'", "key=value"]),
    (["-X", "no.such.property=1"],
     ["kafka-property", 'No such configuration property: "no.such.property"']),
    (["--schema", "nosuchmodule:X"], ["schema", "nosuchmodule:X", "No module named"]),
    (["--log-format", "xml"], ["log-format", "'xml'"]),
    (["--metrics-addr", "nowhere"], ["metrics-addr", "'nowhere'", "HOST:PORT"]),
    # routes: a topic that is not a --topic, a topic routed twice, and malformed ones
    (["--route", "other-topic=archive_signal"],
     ["route", "'other-topic' is not a source topic", "no-such-topic-for-cli"]),
    (["--route", "no-such-topic-for-cli=a", "--route", "no-such-topic-for-cli=b@q"],
     ["route", "'no-such-topic-for-cli' is routed twice"]),
    (["--route", "no-such-topic-for-cli"], ["route", "TOPIC=TASK"]),
    (["--route", "no-such-topic-for-cli=task@"], ["route", "'no-such-topic-for-cli=task@'"]),
    (["--route", "bad topic!=task"], ["route", "Kafka topic name"]),
]


def test_version_names_ingestd_its_libraries_and_the_hot_path() -> None:
    import confluent_kafka

    result = run_cli("--version", "--workers", "not-a-number")  # it exits before validating
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ingestd 0.1.0"
    for name in ("confluent-kafka", "celery", "kombu", "msgspec"):
        assert any(re.fullmatch(rf"{name} \d+\.\d+\S*", line) for line in lines), lines
    assert f"librdkafka {confluent_kafka.libversion()[0]}" in lines
    assert lines[-1] == "hot path: C (ingestd._native)"


def assert_one_line_error(result: subprocess.CompletedProcess[str], words: list[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith("ingestd: error: "), line
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in line, (word, line)
    assert result.stdout == ""
    return line


@pytest.mark.parametrize("prop", sorted(config.PROTECTED_PROPERTIES))
def test_every_protected_property_exits_2_with_one_line(prop: str) -> None:
    value = "read_uncommitted" if prop == "isolation.level" else "true"
    assert_one_line_error(run_cli(*SAFE, "-X", f"{prop}={value}"),
                          ["kafka-property", f"any property but {prop}"])
    env_line = assert_one_line_error(
        run_cli(*SAFE, env={"INGESTD_KAFKA_PROPERTY": f"fetch.min.bytes=1,{prop}={value}"}), [])
    assert f"any property but {prop}" in env_line


@pytest.mark.parametrize(("args", "words"), BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_flag_exits_2_with_one_line(args: list[str], words: list[str]) -> None:
    assert_one_line_error(run_cli(*SAFE, *args), words)


@pytest.mark.parametrize(("env", "words"), [
    ({"INGESTD_WORKERS": "many"}, ["workers", "INGESTD_WORKERS", "'many'"]),
    ({"KAFKA_TOPIC": "bad topic!"}, ["topic", "KAFKA_TOPIC", "'bad topic!'"]),
    ({"INGESTD_CONFIG": "/nonexistent/ingestd.toml"}, ["/nonexistent/ingestd.toml"]),
    ({"INGESTD_TOPIC": "a,b", "INGESTD_ROUTE": "a=x,c=y"},
     ["route", "INGESTD_ROUTE", "'c' is not a source topic"]),
], ids=["INGESTD_WORKERS", "KAFKA_TOPIC", "INGESTD_CONFIG", "INGESTD_ROUTE"])
def test_bad_environment_exits_2_with_one_line(env: dict[str, str], words: list[str]) -> None:
    args = [a for a in SAFE if a not in ("--topic", "no-such-topic-for-cli")]
    assert_one_line_error(run_cli(*args, env=env), words)


BAD_TOML = [
    # (file text, words the one line must contain besides the file's name)
    ("workers = 2\nbatch_size = = 3\n", ["TOML syntax error", "line 2"]),
    ('queue = "unterminated\n', ["TOML syntax error", "line 1"]),
    ("workers = 2\nno_such_key = 1\n", ["unknown key", "'no_such_key'"]),
    ("workers = true\n", ["workers", "True", "a bool", "expected a whole number"]),
    ("batch_size = [1]\n", ["batch-size", "[1]", "a list"]),
    ("log_level = 3\n", ["log-level", "3", "a int"]),
    ("topic = 5\n", ["topic", "expected a list of strings"]),
    ('topic = ["a"]\n[route]\nb = "archive_signal"\n', ["route", "'b' is not a source topic"]),
    ('topic = ["a"]\n[route]\na = 1\n', ["route", "a list (or a table) of strings"]),
    ('topic = ["a.b"]\n[route]\na.b = "x"\n', ["route", "quote a key with dots",
                                                '"a.b" = ...']),
]


@pytest.mark.parametrize(("text", "words"), BAD_TOML, ids=[t.split("\n")[-2] for t, _ in BAD_TOML])
def test_bad_config_file_exits_2_with_one_line(tmp_path: Path, text: str,
                                               words: list[str]) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text(text)
    args = [a for a in SAFE if a not in ("--topic", "no-such-topic-for-cli")]
    assert_one_line_error(run_cli(*args, "--config", str(path)), [str(path), *words])


@pytest.mark.parametrize("text", ['workers = "4"\n', 'topic = "no-such-topic-for-cli"\n',
                                  'drain_timeout = "5"\n'])
def test_toml_string_for_a_number_or_list_is_a_type_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text(text)
    args = [a for a in SAFE if a not in ("--topic", "no-such-topic-for-cli")]
    key = text.split(" ", 1)[0].replace("_", "-")
    assert_one_line_error(run_cli(*args, "--config", str(path)), [str(path), key, "a str"])


# --- 2. --check -----------------------------------------------------------

# The source: flag, env, env VAR (an old variable), file+env (merged -X), default.
DESCRIBED = re.compile(r"^  (\w+)\s+= (.*)  \(([\w+ ]+)\)$")


def described(stdout: str) -> dict[str, tuple[str, str]]:
    """``--check``'s effective configuration: name -> (value as shown, source)."""
    out = {}
    for line in stdout.splitlines():
        m = DESCRIBED.match(line)
        if m:
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def test_check_prints_every_setting_with_its_source_and_reaches_both(
        topic_factory: Callable[..., str], broker_url: str, tmp_path: Path) -> None:
    topic = topic_factory(partitions=4)
    path = tmp_path / "ingestd.toml"
    path.write_text("batch_size = 250\nmax_record_bytes = 4096\n")
    result = run_cli("--check", "--topic", topic, "--bootstrap-servers", stack.BOOTSTRAP,
                     "--broker-url", broker_url, "--config", str(path), "--workers", "3",
                     env={"INGESTD_QUEUE": "q-check", "KAFKA_GROUP": "g-legacy"})
    assert result.returncode == 0, (result.stdout, result.stderr)
    shown = described(result.stdout)
    assert set(shown) == {f.name for f in config.SETTINGS}, result.stdout
    expected_sources = {"topic": "flag", "bootstrap_servers": "flag", "broker_url": "flag",
                        "workers": "flag", "queue": "env", "group_id": "env KAFKA_GROUP",
                        "batch_size": "file", "max_record_bytes": "file"}
    for name, (_, source) in shown.items():
        assert source == expected_sources.get(name, "default"), (name, source)
    assert shown["topic"][0] == repr((topic,))
    assert shown["workers"][0] == "3"
    assert shown["queue"][0] == "'q-check'"
    assert shown["group_id"][0] == "'g-legacy'"
    assert shown["batch_size"][0] == "250"
    assert shown["broker_url"][0] == repr(broker_url)
    assert shown["task"][0] == repr(TASK)
    lines = result.stdout.splitlines()
    assert f"  source topic {topic}: 4 partitions" in lines, result.stdout
    assert "ingestd 0.1.0" in lines and "hot path: C (ingestd._native)" in lines, result.stdout
    assert any(line.startswith(f"celery broker {broker_url}: reachable") for line in lines), \
        result.stdout
    assert not [line for line in lines if line.startswith("problem:")]
    assert lines[-1] == "check: ok"


def test_check_missing_topic_is_one_problem(topic_factory: Callable[..., str],
                                            broker_url: str) -> None:
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    result = run_cli("--check", "--topic", missing, "--bootstrap-servers", stack.BOOTSTRAP,
                     "--broker-url", broker_url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1, result.stdout
    assert missing in problems[0] and "does not exist" in problems[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert any(line.startswith(f"celery broker {broker_url}: reachable")
               for line in result.stdout.splitlines())


def test_check_stopped_broker_is_one_problem_naming_it(topic_factory: Callable[..., str],
                                                       private_redis: PrivateRedis) -> None:
    topic = topic_factory(partitions=1)
    private_redis.stop()
    result = run_cli("--check", "--topic", topic, "--bootstrap-servers", stack.BOOTSTRAP,
                     "--broker-url", private_redis.url)
    assert result.returncode == 1, (result.stdout, result.stderr)
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1, result.stdout
    assert problems[0].startswith(f"problem: celery broker {private_redis.url}: "), problems
    assert f"  source topic {topic}: 1 partitions" in result.stdout.splitlines()
    assert "Traceback" not in result.stdout + result.stderr


# --- 3. secrets -------------------------------------------------------------

SECRET_PROPS = ("-X", f"sasl.password={SECRET}", "-X", f"ssl.key.password={SECRET}",
                "-X", f"sasl.username={SECRET}", "-X", f"ssl.key.pem={SECRET}")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text[max(0, text.find(SECRET) - 300):text.find(SECRET) + 100]


def test_check_never_shows_secrets(topic_factory: Callable[..., str],
                                   private_redis_factory: Callable[..., PrivateRedis]) -> None:
    topic = topic_factory(partitions=1)
    secured = private_redis_factory(password=SECRET)
    assert SECRET in secured.url
    shown_url = secured.url.replace(SECRET, "***")
    base = ("--check", "--topic", topic, "--bootstrap-servers", stack.BOOTSTRAP,
            "--log-level", "DEBUG")
    by_flag = run_cli(*base, "--broker-url", secured.url, *SECRET_PROPS)
    by_env = run_cli(*base, env={"INGESTD_BROKER_URL": secured.url,
                                 "INGESTD_KAFKA_PROPERTY": f"sasl.password={SECRET}"})
    for result in (by_flag, by_env):
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert_no_secret(result.stdout, result.stderr)
        shown = described(result.stdout)
        assert shown["broker_url"][0] == repr(shown_url)
        assert f"celery broker {shown_url}: reachable" in result.stdout
    assert described(by_flag.stdout)["kafka_property"][0] == \
        "('sasl.password=***', 'ssl.key.password=***', 'sasl.username=***', 'ssl.key.pem=***')"
    assert described(by_env.stdout)["kafka_property"] == ("('sasl.password=***',)", "env")

    # The broker refuses: a wrong password, and nothing listening.
    wrong = secured.url.replace(SECRET, f"{SECRET}-wrong")
    nobody = f"redis://:{SECRET}@127.0.0.1:{closed_port()}/0"
    for url in (wrong, nobody):
        result = run_cli(*base, "--broker-url", url, *SECRET_PROPS)
        assert result.returncode == 1, (result.stdout, result.stderr)
        problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
        assert len(problems) == 1 and "celery broker redis://:***@127.0.0.1:" in problems[0]
        assert_no_secret(result.stdout, result.stderr)


@pytest.mark.amqp
def test_check_with_refused_amqp_login_never_shows_the_password(
        topic_factory: Callable[..., str]) -> None:
    topic = topic_factory(partitions=1)
    url = stack.RABBITMQ_URL.replace("guest:guest@", f"guest:{SECRET}@")
    assert SECRET in url
    result = run_cli("--check", "--topic", topic, "--bootstrap-servers", stack.BOOTSTRAP,
                     "--broker-url", url, "--log-level", "DEBUG")
    assert result.returncode == 1, (result.stdout, result.stderr)
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and "celery broker amqp://guest:***@" in problems[0], problems
    assert_no_secret(result.stdout, result.stderr)


@pytest.mark.parametrize(("args", "env", "toml"), [
    (["--broker-url", f"http://user:{SECRET}@h/0"], {}, ""),
    (["--broker-url", f"redis://:{SECRET}@h:port/0"], {}, ""),
    ([], {"INGESTD_BROKER_URL": f"ftp://:{SECRET}@h/0"}, ""),
    ([], {"CELERY_BROKER_URL": f"http://:{SECRET}@h/0"}, ""),
    ([], {}, f'broker_url = "http://user:{SECRET}@h/0"\n'),
    (["-X", f"sasl.password={SECRET}", "-X", "no.such.property=1"], {}, ""),
    (["-X", f"ssl.key.password={SECRET}", "--workers", "0"], {}, ""),
    (["-X", f"sasl.password ={SECRET}", "-X", "nokey"], {}, ""),
    ([], {"INGESTD_KAFKA_PROPERTY": f"broken,sasl.password={SECRET}"}, ""),
    ([], {}, f'kafka_property = ["sasl.password={SECRET}", "broken"]\n'),
], ids=["flag-scheme", "flag-port", "env", "legacy-env", "toml", "rejected-property",
        "bad-workers", "spaced-key", "env-property", "toml-property"])
def test_config_errors_never_show_secrets(tmp_path: Path, args: list[str], env: dict[str, str],
                                          toml: str) -> None:
    extra = list(args)
    if toml:
        path = tmp_path / "ingestd.toml"
        path.write_text(toml)
        extra += ["--config", str(path)]
    sets_broker = "broker" in " ".join([*args, *env, toml]).lower()
    safe = [a for a in SAFE if a not in ("--broker-url", "redis://127.0.0.1:1/0")]
    if not sets_broker:  # a flag would hide the environment's and the file's URL
        safe += ["--broker-url", "redis://127.0.0.1:1/0"]
    result = run_cli(*safe, *extra, env=env)
    line = assert_one_line_error(result, [])
    assert_no_secret(line, result.stdout)
    if sets_broker:  # the URL is shown, redacted
        assert "***" in line, line




@pytest.mark.parametrize("url", [
    f"redis://:{SECRET}/x@127.0.0.1:6379/0",
    f"redis://user:ab+{SECRET}/d=@127.0.0.1:6379/0",
    f"redis://user:{SECRET}%2Fd%3D@127.0.0.1:no-port/0",
], ids=["slash", "base64-like", "percent-encoded"])
def test_broker_url_with_a_slash_in_the_password_is_not_shown(url: str) -> None:
    line = assert_one_line_error(run_cli(*SAFE, "--broker-url", url), ["broker-url"])
    assert_no_secret(line)
    assert "***" in line, line




@pytest.mark.parametrize("prop", sorted(sensitive_properties() | config.SENSITIVE_PROPERTIES))
def test_every_property_librdkafka_calls_sensitive_is_redacted(prop: str) -> None:
    """Walks librdkafka's own list (``tests/rdkafka_conf.py``), not a copy of it."""
    result = run_cli(*SAFE, "-X", f"{prop}={SECRET}")
    assert result.returncode == 1, (result.stdout, result.stderr)  # the check ran
    assert described(result.stdout)["kafka_property"][0] == f"('{prop}=***',)"
    assert_no_secret(result.stdout, result.stderr)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_real_run_never_shows_secrets(topic_factory: Callable[..., str],
                                        private_redis_factory: Callable[..., PrivateRedis],
                                        log_format: str) -> None:
    topic = topic_factory(partitions=2)
    secured = private_redis_factory(password=SECRET)
    n = 50
    stack.produce(topic, [*(stack.signal_record(i) for i in range(n)), b"not json"])
    args = ["--topic", topic, "--group-id", stack.group(), "--bootstrap-servers", stack.BOOTSTRAP,
            "--metrics-addr", "", "--workers", "2", "--dlq-topic", "",
            "--log-level", "DEBUG", "--log-format", log_format,
            *SECRET_PROPS, "-X", "debug=conf,security,broker"]
    # The broker's URL by flag in one run, by environment in the other.
    env: dict[str, str] = {}
    if log_format == "json":
        args += ["--broker-url", secured.url]
    else:
        env["INGESTD_BROKER_URL"] = secured.url
    with Ingestd(*args, env=env) as ingestd:
        assert stack.wait_until(lambda: queue_len(secured.url) >= n, 90), ingestd.output()[-3000:]
        stop(ingestd)
    out = ingestd.output()
    assert_no_secret(out)
    startup = [line for line in out.splitlines() if "starting 2 workers: " in line]
    assert len(startup) == 1, out[-3000:]
    shown_url = secured.url.replace(SECRET, "***")
    assert f"broker_url='{shown_url}'" in startup[0]
    assert "kafka_property=('sasl.password=***', 'ssl.key.password=***', " in startup[0]
    assert f"topic=('{topic}',)" in startup[0]
    assert "invalid record" in out  # the run logged what it did


# --- 4. JSON logs -----------------------------------------------------------


def assert_json_lines(stderr: str) -> list[dict[str, Any]]:
    docs = []
    for line in stderr.splitlines():
        assert line.startswith("{"), line
        doc = orjson.loads(line)
        assert isinstance(doc, dict), line
        assert {"ts", "level", "role", "slot", "event", "msg"} <= set(doc), line
        assert isinstance(doc["ts"], int | float) and doc["ts"] > 0, line
        assert doc["level"] in LOG_LEVELS, line
        assert doc["role"] in ("supervisor", "worker"), line
        if doc["role"] == "worker":
            assert isinstance(doc["slot"], int) and doc["slot"] >= 0, line
        else:
            assert doc["slot"] is None, line
        assert isinstance(doc["event"], str) and doc["event"], line
        assert isinstance(doc["msg"], str), line
        docs.append(doc)
    return docs


def test_json_logs_every_stderr_line_is_one_object(topic_factory: Callable[..., str],
                                                   broker_url: str) -> None:
    topic, dlq = topic_factory(partitions=2), topic_factory(partitions=1, prefix="dlq")
    n = 200
    stack.produce(topic, [*(stack.signal_record(i) for i in range(n)), *INVALID])
    args = [*stack.ingestd_args(topic, stack.group(), broker_url, "--workers", "2"),
            "--dlq-topic", dlq, "--max-record-bytes", MAX_RECORD_BYTES,
            "--log-format", "json", "--log-level", "DEBUG"]
    with Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: queue_len(broker_url) >= n, 90), ingestd.output()[-3000:]
        assert stack.wait_until(lambda: "invalid_record" in ingestd.stderr(), 30)
        assert stack.wait_until(lambda: {'"slot":0', '"slot":1'} <= set(
            re.findall(r'"slot":\d+', ingestd.stderr())), 60), ingestd.stderr()[-3000:]
        stop(ingestd)
    docs = assert_json_lines(ingestd.stderr())
    assert {(d["role"], d["slot"]) for d in docs} >= {("supervisor", None), ("worker", 0),
                                                      ("worker", 1)}
    events = {d["event"] for d in docs}
    assert {"supervisor", "invalid_record", "assignment"} <= events, events
    assert any(d["level"] == "WARNING" and d["event"] == "invalid_record" for d in docs)
    assert sum("starting 2 workers: " in d["msg"] for d in docs) == 1


# A property librdkafka warns about (CONFWARN) while it accepts it: SASL settings on a
# PLAINTEXT connection, as when an operator prepares a move to SASL.
WARNED_PROPERTY = ("-X", "sasl.mechanism=PLAIN")


def test_json_logs_of_check_are_objects_too(topic_factory: Callable[..., str],
                                            broker_url: str) -> None:
    topic = topic_factory(partitions=1)
    result = run_cli("--check", "--topic", topic, "--bootstrap-servers", stack.BOOTSTRAP,
                     "--broker-url", broker_url, "--log-format", "json", "--log-level", "DEBUG")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert_json_lines(result.stderr)


def test_json_logs_of_check_with_a_librdkafka_warning(topic_factory: Callable[..., str],
                                                      broker_url: str) -> None:
    topic = topic_factory(partitions=1)
    result = run_cli("--check", "--topic", topic, "--bootstrap-servers", stack.BOOTSTRAP,
                     "--broker-url", broker_url, "--log-format", "json", *WARNED_PROPERTY)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert_json_lines(result.stderr)


def test_json_logs_of_a_run_with_a_librdkafka_warning(topic_factory: Callable[..., str],
                                                      broker_url: str) -> None:
    topic = topic_factory(partitions=1)
    n = 20
    stack.produce(topic, (stack.signal_record(i) for i in range(n)))
    args = stack.ingestd_args(topic, stack.group(), broker_url, "--log-format", "json",
                              *WARNED_PROPERTY)
    with Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: queue_len(broker_url) >= n, 90), ingestd.output()[-3000:]
        stop(ingestd)
    docs = assert_json_lines(ingestd.stderr())
    # The worker's own consumer reports the warning, as JSON, through its logger.
    assert any(d["event"] == "librdkafka" and "CONFWARN" in d["msg"] for d in docs)


# --- 5. metrics ---------------------------------------------------------------


def expected_counts(topic: str, valid: int, invalid: list[str]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {
        ("ingestd_messages_consumed_total", topic): valid + len(invalid),
        ("ingestd_messages_dispatched_total", topic, TASK): valid,
        ("ingestd_dlq_produced_total", topic): len(invalid),
    }
    for reason in ("decode", "not_object", "schema", "too_large"):
        out[("ingestd_messages_invalid_total", topic, reason)] = invalid.count(reason)
    return out


def counts(samples: Samples, topic: str) -> dict[tuple[str, ...], float | None]:
    out: dict[tuple[str, ...], float | None] = {
        ("ingestd_messages_consumed_total", topic):
            sample(samples, "ingestd_messages_consumed_total", topic=topic),
        ("ingestd_messages_dispatched_total", topic, TASK):
            sample(samples, "ingestd_messages_dispatched_total", topic=topic, task=TASK),
        ("ingestd_dlq_produced_total", topic):
            sample(samples, "ingestd_dlq_produced_total", topic=topic),
    }
    for reason in ("decode", "not_object", "schema", "too_large"):
        out[("ingestd_messages_invalid_total", topic, reason)] = \
            sample(samples, "ingestd_messages_invalid_total", topic=topic, reason=reason)
    return out


def corpus(start: int, valid: int) -> tuple[list[bytes], list[str]]:
    """``valid`` signals with every invalid record in between; and the invalid reasons."""
    records = [stack.signal_record(i) for i in range(start, start + valid)]
    step = max(1, valid // (len(INVALID) + 1))
    for k, bad in enumerate(INVALID, start=1):
        records.insert(k * step + k - 1, bad)
    return records, list(INVALID.values())


ASSIGNMENT = re.compile(r" worker-(\d+) assignment: (assigned|revoked|lost) (.*)$")
PARTITION = re.compile(r"[\w.-]+\[(\d+)\]")


def ownership(text_log: str) -> dict[int, set[int]]:
    """Slot -> the partitions it owns, from the workers' ``assignment`` log lines."""
    owned: dict[int, set[int]] = {}
    for line in text_log.splitlines():
        m = ASSIGNMENT.search(line)
        if m:
            parts = {int(p) for p in PARTITION.findall(m.group(3))}
            mine = owned.setdefault(int(m.group(1)), set())
            if m.group(2) == "assigned":
                mine |= parts
            else:
                mine -= parts
    return owned


def keyed_produce(topic: str, records: list[bytes], first_key: int) -> None:
    """Keyed, so that every partition gets some of them."""
    stack.produce(topic, records, keys=(f"k{first_key + i}".encode()
                                        for i in range(len(records))))


def test_metrics_count_the_corpus_exactly_and_survive_a_killed_worker(
        topic_factory: Callable[..., str], broker_url: str) -> None:
    topic, dlq = topic_factory(partitions=4), topic_factory(partitions=1, prefix="dlq")
    g = stack.group()
    first, first_invalid = corpus(0, 2000)
    port = stack.free_port()
    base = f"http://127.0.0.1:{port}"
    args = stack.ingestd_args(topic, g, broker_url, "--metrics-addr", f"127.0.0.1:{port}",
                              "--workers", "2", "--dlq-topic", dlq,
                              "--max-record-bytes", MAX_RECORD_BYTES, "--batch-size", "300")
    with Ingestd(*args) as ingestd:
        # Produced once the group settled: a rebalance mid-batch may repeat records
        # (at least once), and these counts are exact.
        assert stack.wait_until(lambda: sorted(map(len, ownership(ingestd.stderr()).values()))
                                == [2, 2], 90), ingestd.stderr()[-3000:]
        keyed_produce(topic, first, 0)
        want = expected_counts(topic, 2000, first_invalid)
        assert stack.wait_until(lambda: queue_len(broker_url) >= 2000, 120), ingestd.output()
        assert stack.wait_until(lambda: counts(scrape(base), topic) == want, 30), \
            (counts(scrape(base), topic), want)
        # Committed, so the worker killed below has nothing in flight to repeat.
        assert stack.wait_until(lambda: stack.committed_offsets(g, topic, 4) ==
                                stack.end_offsets(topic, 4), 30)
        samples = scrape(base)
        assert sample(samples, "ingestd_workers_alive") == 2
        assert sample(samples, "ingestd_worker_restarts_total") == 0
        assert stack.http_get(f"{base}/healthz")[0] == 200
        assert stack.http_get(f"{base}/livez") == (200, b"ok\n")
        assert stack.wait_until(lambda: stack.http_get(f"{base}/readyz")[0] == 200, 60)
        status, body = stack.http_get(f"{base}/readyz")
        assert status == 200 and orjson.loads(body) == {"ready": True, "workers": {}}
        assert queue_len(broker_url) == 2000
        assert len(stack.consume_all(dlq, len(INVALID))) == len(INVALID)

        pids = ingestd.worker_pids()
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        second, second_invalid = corpus(2000, 1000)
        keyed_produce(topic, second, len(first))
        assert stack.wait_until(lambda: len(ingestd.worker_pids()) == 2 and
                                pids[0] not in ingestd.worker_pids(), 60)
        total = expected_counts(topic, 3000, first_invalid + second_invalid)
        assert stack.wait_until(lambda: queue_len(broker_url) >= 3000, 120), ingestd.output()
        assert stack.wait_until(lambda: counts(scrape(base), topic) == total, 30), \
            (counts(scrape(base), topic), total)
        assert stack.wait_until(lambda: sample(scrape(base), "ingestd_workers_alive") == 2, 30)
        samples = scrape(base)
        assert sample(samples, "ingestd_worker_restarts_total") == 1
        assert stack.wait_until(lambda: stack.http_get(f"{base}/readyz")[0] == 200, 60)
        stop(ingestd)
    ids = [t["id"] for t in stack.queued_tasks(broker_url)]
    assert len(ids) == len(set(ids)) == 3000  # nothing repeated, nothing lost
    assert len(stack.consume_all(dlq, 2 * len(INVALID))) == 2 * len(INVALID)
    assert "died (signal SIGKILL)" in ingestd.output()


# --- 6. /readyz follows the Celery broker ------------------------------------


def test_readyz_is_503_naming_the_worker_while_the_broker_is_down(
        topic_factory: Callable[..., str],
        private_redis_factory: Callable[..., PrivateRedis]) -> None:
    topic = topic_factory(partitions=2)
    broker = private_redis_factory(password=SECRET)
    port = stack.free_port()
    base = f"http://127.0.0.1:{port}"
    args = stack.ingestd_args(topic, stack.group(), broker.url,
                              "--metrics-addr", f"127.0.0.1:{port}", "--workers", "2",
                              "--retry-max-backoff", "1")
    with Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: stack.http_get(f"{base}/readyz")[0] == 200, 90), \
            (stack.http_get(f"{base}/readyz"), ingestd.output()[-3000:])
        broker.stop()

        def both_waiting() -> bool:
            status, body = stack.http_get(f"{base}/readyz")
            return status == 503 and set(orjson.loads(body)["workers"]) == {"0", "1"}

        assert stack.wait_until(both_waiting, 60), stack.http_get(f"{base}/readyz")
        status, body = stack.http_get(f"{base}/readyz")
        doc = orjson.loads(body)
        assert status == 503 and doc["ready"] is False
        for slot, why in doc["workers"].items():
            assert "celery broker unreachable" in why, (slot, why)
        assert SECRET not in body.decode()
        assert stack.http_get(f"{base}/healthz")[0] == 200  # the supervisor itself is fine
        # Records that arrive during the outage wait; none is lost.
        stack.produce(topic, (stack.signal_record(i) for i in range(100)),
                      keys=(f"k{i}".encode() for i in range(100)))
        broker.start()
        assert stack.wait_until(lambda: stack.http_get(f"{base}/readyz")[0] == 200, 60), \
            stack.http_get(f"{base}/readyz")
        assert orjson.loads(stack.http_get(f"{base}/readyz")[1]) == {"ready": True, "workers": {}}
        expected = {f"{topic}-{p}-{o}" for p, end in stack.end_offsets(topic, 2).items()
                    for o in range(end)}
        assert len(expected) == 100
        assert stack.wait_until(lambda: {t["id"] for t in stack.queued_tasks(broker.url)}
                                == expected, 60)
        stop(ingestd)
    assert_no_secret(ingestd.output())
