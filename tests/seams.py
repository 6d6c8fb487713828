"""A worker's per-record path without its clients: :class:`Pipeline`'s decode and build on
records made in memory, as the benchmarks and the hostile-input tests drive them."""

from __future__ import annotations

from confluent_kafka import Message

from ingestd.celery import dispatch
from ingestd.config import Config
from ingestd.quarantine import Quarantine
from ingestd.worker.pipeline import Batch, Pipeline


class Seam:
    """A pipeline for the ``owned`` partitions, with no consumer, no dead-letter producer
    and no connection; ``dispatcher`` builds the messages."""

    def __init__(self, config: Config, owned: set[tuple[str, int]],
                 dispatcher: dispatch.Dispatcher | None = None) -> None:
        self.pipeline = Pipeline(config, dispatcher or dispatch.create(config), Quarantine(()),
                                 lambda err: None)
        self.owned = owned
        self.dispatcher = self.pipeline.dispatcher

    def decode(self, messages: list[Message]) -> Batch:
        return self.pipeline.decode(messages, self.owned, 0)[0]

    def build(self, batch: Batch) -> None:
        self.pipeline.build(batch)


def decoder(config: Config, owned: set[tuple[str, int]],
            dispatcher: dispatch.Dispatcher | None = None) -> Seam:
    return Seam(config, owned, dispatcher)
