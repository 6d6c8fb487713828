"""``ingestd``: parse the configuration, then ``--check`` or run the supervisor; or one of
the operator's commands, ``ingestd replay`` and ``ingestd status``."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence

from ingestd import config as cfg
from ingestd import logs
from ingestd.errors import ConfigError, ExitCode, IngestdError


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["status"]:
        from ingestd.tools import status

        return status.main(args[1:])
    if args[:1] == ["replay"]:
        from ingestd.tools import replay

        return replay.main(args[1:])
    # Signals stay blocked until the supervisor's handlers are installed.
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                              signal.SIGQUIT, signal.SIGTTIN, signal.SIGTTOU))
    try:
        loaded = cfg.load(args)
        logs.configure(loaded.config.log_format, loaded.config.log_level)
        validate(loaded.config)
    except ConfigError as exc:
        print(f"ingestd: error: {cfg.redact(str(exc))}", file=sys.stderr)
        return ExitCode.CONFIG
    if loaded.check:
        from ingestd.tools.check import run_check

        return run_check(loaded)
    return supervise(loaded, args)


def validate(config: cfg.Config) -> None:
    """Checks that need a worker's libraries: the schema module imports, and librdkafka
    accepts every property. They run in a child process, so that the supervisor
    itself neither imports confluent_kafka nor creates a librdkafka object before
    it forks its workers."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        message = ""
        try:
            _validate_here(config)
        except ConfigError as exc:
            message = str(exc)
        except Exception as exc:  # reported as a configuration error
            message = f"{type(exc).__name__}: {exc}"
        os.write(write_end, message.encode()[:4096])
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    os.waitpid(pid, 0)
    if message:
        raise ConfigError(message)


def _validate_here(config: cfg.Config) -> None:
    from ingestd import kafka, schema

    schema.load_struct(config.schema)
    if config.group_type == "share":
        kafka.check_properties(kafka.share_consumer_config(config, 0), share=True)
    else:
        kafka.check_properties(kafka.consumer_config(config, 0))


def supervise(loaded: cfg.Loaded, args: list[str]) -> int:
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    owned = metrics_dir is None
    if metrics_dir is None:
        metrics_dir = tempfile.mkdtemp(prefix="ingestd-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    else:  # wipe before the first fork: files of an earlier run would add to the counts
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.makedirs(metrics_dir, exist_ok=True)
    from ingestd.supervisor import http
    from ingestd.supervisor.supervisor import Supervisor

    def reload() -> cfg.Loaded:
        again = cfg.load(args)
        validate(again.config)
        return again

    sup = Supervisor(loaded, reload)
    log = logs.get("supervisor")
    try:
        if loaded.config.metrics_addr:
            try:
                http.serve(loaded.config.metrics_addr, sup.alive, sup.readiness, sup.detail)
            except OSError as exc:
                log.error("cannot serve metrics on %s: %s", loaded.config.metrics_addr,
                          exc.strerror)
                return ExitCode.CONFIG
        return sup.run()
    except IngestdError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)
    finally:
        if owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
