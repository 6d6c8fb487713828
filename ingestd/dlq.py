"""The dead-letter topic: invalid records with headers that say why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Producer

from ingestd.errors import DispatchError

FLUSH_TIMEOUT = 30.0


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

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return [
            ("ingestd.error", self.reason.encode()),
            ("ingestd.error.detail", self.detail.encode()[:1024]),
            ("ingestd.source.topic", self.topic.encode()),
            ("ingestd.source.partition", str(self.partition).encode()),
            ("ingestd.source.offset", str(self.offset).encode()),
            ("ingestd.source.timestamp", str(self.timestamp).encode()),
        ]


class DeadLetterProducer:
    """Produces a batch of dead letters and waits for every delivery report."""

    def __init__(self, topic: str, props: dict[str, Any]) -> None:
        self.topic = topic
        self.producer = Producer(props)

    def send(self, letters: list[DeadLetter]) -> None:
        """Return once Kafka acknowledged every letter; raise DispatchError otherwise."""
        if not letters:
            return
        errors: list[KafkaError] = []

        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        for letter in letters:
            while True:
                try:
                    self.producer.produce(self.topic, value=letter.value, key=letter.key,
                                          headers=letter.headers(), on_delivery=report)
                    break
                except BufferError:
                    self.producer.poll(0.1)
        remaining = self.producer.flush(FLUSH_TIMEOUT)
        if remaining or errors:
            first = errors[0].str() if errors else f"{remaining} not delivered in time"
            raise DispatchError(f"dead-letter topic {self.topic!r}: {first}")

    def close(self) -> None:
        self.producer.flush(FLUSH_TIMEOUT)
