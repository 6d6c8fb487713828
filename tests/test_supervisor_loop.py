"""The supervisor's loop survives its own surprises, and leaves no worker behind."""

from __future__ import annotations

import pytest

from ingestd.config import Config, Loaded
from ingestd.supervisor.supervisor import Supervisor


def _supervisor(**settings: str) -> Supervisor:
    loaded = Loaded(Config(workers=1, metrics_addr="", **settings), {})
    sup = Supervisor(loaded, lambda: loaded)
    sup.install_signals = lambda: None  # type: ignore[method-assign]  # not pytest's own
    return sup


def test_an_exception_in_a_round_is_logged_and_the_loop_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    sup = _supervisor()
    rounds: list[int] = []

    def step() -> None:
        rounds.append(1)
        if len(rounds) == 1:
            raise ValueError("a torn file")
        sup.exit_code = 0

    sup.step = step  # type: ignore[method-assign]
    sup.sleep = lambda: None  # type: ignore[method-assign]
    assert sup.run() == 0
    assert len(rounds) == 2
    assert "supervisor loop: unexpected error; going on" in caplog.text
    assert "ValueError: a torn file" in caplog.text


def test_whatever_ends_the_loop_no_worker_is_left_behind() -> None:
    sup = _supervisor()
    stopped: list[int] = []
    sup.workers = {0: object()}  # type: ignore[dict-item]

    def stop_now(code: int = 0) -> None:
        stopped.append(code)
        sup.workers.clear()

    def step() -> None:
        raise KeyboardInterrupt

    sup.step = step  # type: ignore[method-assign]
    sup.stop_now = stop_now  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        sup.run()
    assert stopped == [1]


def test_starting_at_the_end_warns(caplog: pytest.LogCaptureFixture) -> None:
    sup = _supervisor(offset_reset="latest")
    sup.exit_code = 0
    sup.run()
    assert "--offset-reset latest" in caplog.text and "skipped" in caplog.text


def test_the_supervisor_imports_neither_librdkafka_nor_celery() -> None:
    """librdkafka is not fork-safe: a worker builds its clients after fork."""
    import subprocess
    import sys

    code = ("import sys, ingestd.cli, ingestd.supervisor.supervisor, ingestd.supervisor.http; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('confluent_kafka', 'celery', 'kombu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_a_worker_that_cannot_start_for_want_of_file_descriptors_is_tried_again(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import errno
    import os

    from ingestd.supervisor import supervisor

    def no_fd() -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    sup = _supervisor()
    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(supervisor, "Heartbeat", no_fd)
    sup.spawn(0)
    assert sup.workers == {} and sup.next_spawn[0] > 0
    assert len(os.listdir("/proc/self/fd")) == fds  # its holding file closed again
    assert "worker 0 cannot start: [Errno 24] Too many open files; trying again" in caplog.text
