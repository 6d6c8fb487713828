"""A worker's per-record path without its clients: :meth:`Worker.decode` and
:meth:`Worker.build` on records made in memory, as the benchmarks and the hostile-input
tests drive them."""

from __future__ import annotations

from types import SimpleNamespace

from ingestd.celery import dispatch
from ingestd.config import Config
from ingestd.quarantine import Quarantine
from ingestd.worker.loop import Worker, task_bound, validator

__all__ = ["Worker", "decoder"]


def decoder(config: Config, owned: set[tuple[str, int]],
            dispatcher: dispatch.Dispatcher | None = None) -> Worker:
    """A worker that decodes records of the ``owned`` partitions and, given a dispatcher,
    builds their messages: no consumer, no dead-letter producer, no connection."""
    w = Worker.__new__(Worker)
    w.config = config
    w.validator = validator(config)
    w.task_bound = task_bound(config)
    w.assignment = SimpleNamespace(revision=0, owned=owned)  # type: ignore[assignment]
    w.quarantine = Quarantine(())
    w.carry = []
    if dispatcher is not None:
        w.dispatcher = dispatcher
    return w
