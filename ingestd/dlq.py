"""The dead-letter topic: invalid records with headers that say why.

A dead letter carries the record's key, value and headers, then ingestd's own
headers in a fixed order (:data:`HEADERS`). A letter that Kafka refuses as too
large (the producer's ``message.max.bytes``, or the topic's
``max.message.bytes``) is still delivered, first without its value, then also
without its key and the record's headers; ``ingestd.value.omitted`` and its
siblings give the sizes left out. The original stays in the source topic, at
the coordinates the headers name.

Letters are produced through librdkafka's C API (:mod:`ingestd.rdkafka`): a record's
header names may be any bytes, which confluent-kafka's producer cannot write, and a
letter keeps them byte for byte. A topic that refuses letters (missing where the
broker creates none, an ACL) raises :class:`DeadLetterError`, which the worker
retries as it retries a Celery broker that is down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from ingestd.errors import DispatchError
from ingestd.rdkafka import Delivery, Header, Producer

# A letter's fate is known once a flush returns: librdkafka gives up on it first, so a
# retry never sends a letter that may still be delivered.
DELIVERY_TIMEOUT = 25.0
FLUSH_TIMEOUT = 30.0
DETAIL_MAX = 1024
ERROR, DETAIL = "ingestd.error", "ingestd.error.detail"
TOPIC, PARTITION, OFFSET = "ingestd.source.topic", "ingestd.source.partition", \
    "ingestd.source.offset"
TIMESTAMP, GROUP = "ingestd.source.timestamp", "ingestd.source.group"
VALUE_OMITTED, KEY_OMITTED, HEADERS_OMITTED = \
    "ingestd.value.omitted", "ingestd.key.omitted", "ingestd.headers.omitted"
# ingestd's headers, in the order every dead letter carries them; the last three
# only when Kafka refused the letter as too large.
HEADERS = (ERROR, DETAIL, TOPIC, PARTITION, OFFSET, TIMESTAMP, GROUP,
           VALUE_OMITTED, KEY_OMITTED, HEADERS_OMITTED)
_OWN = frozenset(HEADERS)
# Written by ``ingestd replay`` on each record it sends back: how often the record was
# replayed. A record's own header, kept when it is dead-lettered again.
REPLAY_COUNT = "ingestd.replay.count"

Headers = list[Header]
FULL, NO_VALUE, BARE = 0, 1, 2  # how much of the record a letter still carries


@dataclass(frozen=True)
class DeadLetter:
    """An invalid record and why it was refused."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    reason: str
    detail: str
    headers: Headers | None = None  # the record's own

    def record(self, group: str, trim: int = FULL) -> tuple[bytes | None, bytes | None, Headers]:
        """Key, value and headers of the letter; ``trim`` leaves out the value (NO_VALUE),
        or the value, key and the record's headers (BARE)."""
        own: Headers = [
            (ERROR, self.reason.encode()),
            (DETAIL, self.detail.encode(errors="replace")[:DETAIL_MAX]
             .decode(errors="ignore").encode()),  # not cut inside a character
            (TOPIC, self.topic.encode()),
            (PARTITION, str(self.partition).encode()),
            (OFFSET, str(self.offset).encode()),
            (TIMESTAMP, str(self.timestamp).encode()),
            (GROUP, group.encode()),
        ]
        theirs: Headers = [(k, v) for k, v in self.headers or () if k not in _OWN]
        key, value = self.key, self.value
        if trim >= NO_VALUE:
            own.append((VALUE_OMITTED, str(len(value or b"")).encode()))
            value = b""
        if trim >= BARE:
            own += [(KEY_OMITTED, str(len(key or b"")).encode()),
                    (HEADERS_OMITTED, str(len(theirs)).encode())]
            key, theirs = None, []
        return key, value, theirs + own


def split(headers: Headers | None) -> tuple[dict[str, str], Headers]:
    """A dead letter's headers as ingestd's own (name -> text) and the record's (the
    inverse of :meth:`DeadLetter.record`)."""
    own: dict[str, str] = {}
    theirs: Headers = []
    for key, value in headers or ():
        if key in _OWN:
            own[key] = (value or b"").decode(errors="replace")
        else:
            theirs.append((key, value))
    return own, theirs


def source(headers: Headers | None) -> tuple[str, int, int] | None:
    """The topic, partition and offset of the record a dead letter holds; None for a
    record that is not an ingestd dead letter."""
    own, _ = split(headers)
    try:
        return own[TOPIC], int(own[PARTITION]), int(own[OFFSET])
    except (KeyError, ValueError):
        return None


class DeadLetterError(DispatchError):
    """The dead-letter topic refused letters; ``undelivered`` are those not acknowledged."""

    def __init__(self, topic: str, why: str, undelivered: list[DeadLetter]) -> None:
        super().__init__(f"dead-letter topic {topic!r} refused {len(undelivered)} letters: "
                         f"{why}")
        self.undelivered = undelivered


class DeadLetterProducer:
    """Produces a batch of dead letters and waits for every delivery report."""

    def __init__(self, topic: str, props: dict[str, Any], group: str) -> None:
        self.topic = topic
        self.group = group
        self.props = {**props, "message.timeout.ms": int(DELIVERY_TIMEOUT * 1000)}
        self.producer = Producer(self.props)

    def send(self, letters: list[DeadLetter]) -> None:
        """Return once Kafka acknowledged every letter, trimmed where it was too large;
        raise :class:`DeadLetterError`, naming the letters not acknowledged, otherwise."""
        pending = [(letter, FULL) for letter in letters]
        while pending:
            delivered: list[DeadLetter] = []
            smaller: list[tuple[DeadLetter, int]] = []  # too large: sent again with less
            errors: list[KafkaError] = []
            for letter, trim in pending:
                self._produce(letter, trim, delivered, smaller, errors)
            self.producer.flush(FLUSH_TIMEOUT)
            if len(delivered) + len(smaller) < len(pending):
                done = {id(letter) for letter in delivered}
                why = errors[0].str() if errors else "not acknowledged in time"
                if errors:  # a fresh client: librdkafka keeps an unknown topic unknown
                    self._renew()
                raise DeadLetterError(self.topic, why, [x for x, _ in pending
                                                        if id(x) not in done])
            pending = smaller

    def _produce(self, letter: DeadLetter, trim: int, delivered: list[DeadLetter],
                 smaller: list[tuple[DeadLetter, int]], errors: list[KafkaError]) -> None:
        """Queue one letter. One that is too large for Kafka goes to ``smaller``, to be sent
        again with less of the record; any other refusal is the topic's, not the
        letter's, and goes to ``errors``."""

        def refused(err: KafkaError) -> None:
            if err.code() == KafkaError.MSG_SIZE_TOO_LARGE and trim < BARE:
                smaller.append((letter, trim + 1))
            else:
                errors.append(err)

        def report(err: KafkaError | None, _delivery: Delivery) -> None:
            if err is None:
                delivered.append(letter)
            else:
                refused(err)

        key, value, headers = letter.record(self.group, trim)
        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key, headers=headers,
                                      on_delivery=report)
                return
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:
                refused(exc.args[0])
                return

    def _renew(self) -> None:
        """Replace the client, after a refusal: librdkafka remembers a topic it was told is
        unknown for up to ``metadata.max.age.ms`` (15 minutes), even once it exists."""
        self.producer.close()
        self.producer = Producer(self.props)

    def close(self) -> None:
        self.producer.close(FLUSH_TIMEOUT)
