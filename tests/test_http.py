"""The supervisor's HTTP endpoint cannot hurt the supervisor: slow or many clients hold a
bounded number of its threads and file descriptors, and only for a while."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ingestd.supervisor import http
from tests import stack


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(http, "READ_TIMEOUT", 1.0)
    port = stack.free_port()
    srv = http.serve(f"127.0.0.1:{port}", lambda: True, lambda: (True, {}))
    yield f"http://127.0.0.1:{port}"
    srv.shutdown()
    srv.server_close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_half_sent_requests_hold_a_bounded_number_of_threads_and_only_for_a_while(
        server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    threads, fds = threading.active_count(), _open_fds()
    clients = []
    for _ in range(500):  # each sends half a request and waits
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /livez HTTP/1.1\r\n")
        clients.append(s)
    time.sleep(0.5)
    assert threading.active_count() - threads <= http.MAX_CONNECTIONS
    # The server's side: what the clients' own sockets do not explain.
    assert _open_fds() - fds - len(clients) <= http.MAX_CONNECTIONS + 2
    assert stack.wait_until(lambda: stack.http_get(f"{server}/livez")[0] == 200, 10,
                            interval=0.2)  # the slow ones timed out
    for s in clients:
        s.close()
    assert stack.wait_until(lambda: threading.active_count() <= threads, 10)


def test_a_connection_over_the_cap_is_closed_at_once(server: str) -> None:
    port = int(server.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(http.MAX_CONNECTIONS)]
    time.sleep(0.2)
    extra = socket.create_connection(("127.0.0.1", port))
    extra.settimeout(0.5)
    try:
        extra.sendall(b"GET /livez HTTP/1.0\r\n\r\n")
        answer = extra.recv(100)
    except ConnectionResetError:  # closed while the request was on its way
        answer = b""
    assert answer == b""  # closed without an answer
    for s in [*held, extra]:
        s.close()
    assert stack.wait_until(lambda: stack.http_get(f"{server}/livez")[0] == 200, 10,
                            interval=0.2)


@pytest.mark.stack
def test_a_running_supervisor_keeps_its_file_descriptors_under_a_flood(
        topic_factory: Callable[..., str], broker_url: str) -> None:
    """1,500 half-sent requests to a real ingestd: its supervisor holds a bounded number
    of sockets, answers /livez once they time out, and still replaces a dead worker."""
    topic = topic_factory(partitions=1)
    port = stack.free_port()
    args = [*stack.ingestd_args(topic, stack.group(), broker_url), "--metrics-addr",
            f"127.0.0.1:{port}"]
    with stack.Ingestd(*args) as ingestd:
        assert stack.wait_until(lambda: stack.http_get(f"http://127.0.0.1:{port}/readyz")[0]
                                == 200, 60), ingestd.output()[-2000:]
        assert ingestd.proc is not None
        fds = Path(f"/proc/{ingestd.proc.pid}/fd")
        before = len(list(fds.iterdir()))
        clients = []
        for _ in range(1500):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            clients.append(s)
        time.sleep(1)
        assert len(list(fds.iterdir())) - before <= http.MAX_CONNECTIONS + 8
        assert stack.wait_until(
            lambda: stack.http_get(f"http://127.0.0.1:{port}/livez")[0] == 200, 30)
        (worker,) = ingestd.worker_pids()
        os.kill(worker, signal.SIGKILL)
        assert stack.wait_until(lambda: ingestd.worker_pids() not in ([], [worker]), 30)
        for s in clients:
            s.close()
        ingestd.signal(signal.SIGTERM)
        assert ingestd.wait(60) == 0, ingestd.output()[-2000:]
