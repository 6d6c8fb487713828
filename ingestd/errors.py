"""One error tree and the process exit codes."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the supervisor and its workers."""

    OK = 0
    RUNTIME = 1  # a runtime failure: fatal Kafka error, unrecoverable broker error
    CONFIG = 2  # the configuration is invalid; nothing was started
    BOOT = 3  # a worker could not boot (bad schema module, rejected Kafka property)


class IngestdError(Exception):
    """Base of every error ingestd raises on purpose."""

    exit_code = ExitCode.RUNTIME


class ConfigError(IngestdError):
    """A setting has a bad value; the message names the setting and the value."""

    exit_code = ExitCode.CONFIG


class BootError(IngestdError):
    """A worker cannot start with this configuration."""

    exit_code = ExitCode.BOOT


class KafkaFatalError(IngestdError):
    """librdkafka reported an error it will not recover from."""


class DispatchError(IngestdError):
    """The Celery broker did not accept a batch; the batch is kept and retried."""


class RecordError(IngestdError):
    """A record cannot be dispatched; ``reason`` is its dead-letter category."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
