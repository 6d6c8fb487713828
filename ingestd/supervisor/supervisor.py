"""The supervisor: forks N workers and keeps them alive, stops them cleanly.

One loop, as in gunicorn's arbiter: handle queued signals → reap children →
check heartbeats → bring the worker count back to N. Signal handlers only
enqueue. The supervisor imports neither confluent_kafka nor celery: a worker
builds its clients after fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import faulthandler
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ingestd import logs
from ingestd.celery import tls as brokertls
from ingestd.config import Config, Loaded, summary
from ingestd.errors import ExitCode, IngestdError
from ingestd.heartbeat import READY, REJOIN, REPLACE, STARTING, Heartbeat
from ingestd.quarantine import Holding, Quarantine, Range, Suspects
from ingestd.ratelimit import RateLimit
from ingestd.supervisor.systemd import Notifier

log = logs.get("supervisor")
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGCHLD)
STOPS = (signal.SIGTERM, signal.SIGINT, REPLACE)
LOOP_INTERVAL = 0.5
MAX_RESTART_BACKOFF = 30.0
BOOT_FAILURES_LIMIT = 5  # a slot that dies this often in a row without ever beating stops ingestd
QUICK_DEATH = 10.0  # a worker that dies this soon after it started is restarted with backoff
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_NAME = 15
WATCHER_NAME = "ingestd-owners"  # the watcher's process name (ps -o comm, top)
WATCHER = -1  # the slot number of the process that watches partition ownership (owners.py)
WATCHER_RESTART = 5.0
REJOIN_INTERVAL = 30.0  # between two requests to rejoin while partitions lack an owner
INSECURE = ("--broker-tls-insecure: the Celery broker's certificate is not verified; anyone "
            "on the path can take its password and the tasks")


@dataclass
class WorkerHandle:
    slot: int
    pid: int
    heartbeat: Heartbeat
    holding: Holding | None = None  # the records it holds (see ingestd.quarantine)
    stuck: bool = False  # killed because its loop stopped beating
    generation: int = 0  # HUP replaces the workers of older generations
    stopping_since: float | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, loaded: Loaded, reload: Callable[[], Loaded]) -> None:
        self.config: Config = loaded.config
        self.reload_config = reload
        self.workers: dict[int, WorkerHandle] = {}  # slot -> handle
        self.watcher: WorkerHandle | None = None  # group mode: see ingestd.supervisor.owners
        self.next_watcher = 0.0
        self.next_rejoin = 0.0
        self.target = self.config.workers
        self.signals: list[int] = []
        self.suspects = Suspects()  # what dead workers held; what is quarantined
        self.failures: dict[int, int] = {}  # slot -> failures in a row
        self.quick_deaths: dict[int, int] = {}  # slot -> deaths in a row soon after start
        self.restarts: dict[int, int] = {}  # slot -> times replaced after it died
        # Held while a heartbeat is read from the HTTP thread or closed by the loop.
        self.lock = threading.Lock()
        self.next_spawn: dict[int, float] = {}
        self.exit_code: int | None = None  # set when the loop should end
        self.draining_until: float | None = None
        self.last_loop = time.monotonic()
        self.generation = 0
        self.rolling: list[int] = []  # slots a HUP has yet to replace
        self.drain_failed = False
        self.systemd = Notifier()
        self.errors = logs.RateLimited(log)  # a round's unexpected exception
        self.rate_limit = RateLimit(self.config.max_rate)  # shared with every worker
        _set_max_rate(self.config.max_rate)
        self._pipe_r, self._pipe_w = os.pipe()
        os.set_blocking(self._pipe_r, False)
        os.set_blocking(self._pipe_w, False)

    # --- signals ----------------------------------------------------------

    def _enqueue(self, signum: int, _frame: object) -> None:
        if len(self.signals) < 16:
            self.signals.append(signum)
        with contextlib.suppress(BlockingIOError):
            os.write(self._pipe_w, b".")

    def install_signals(self) -> None:
        for sig in HANDLED:
            signal.signal(sig, self._enqueue)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self.draining_until is not None and signum == signal.SIGINT:
                log.warning("second INT: stopping at once")
                self.stop_now()
                return
            self.drain()
        elif signum == signal.SIGQUIT:
            log.warning("QUIT: stopping at once")
            self.stop_now()
        elif signum == signal.SIGHUP:
            self.reload()
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            self.resize(self.target + (1 if signum == signal.SIGTTIN else -1))

    # --- lifecycle --------------------------------------------------------

    def run(self) -> int:
        """The loop, until a stop ends it. An exception in one round (a bug, a library's
        surprise) is logged and the next round goes on: the supervisor is what keeps the
        workers alive. Whatever ends the loop, no worker is left behind."""
        log.info("starting %d workers: %s", self.target, summary(self.config))
        if brokertls.insecure(self.config):
            log.warning(INSECURE)
        if self.config.offset_reset == "latest":
            log.warning("--offset-reset latest: a partition without a committed offset, or "
                        "with one out of range, starts at its end; the records before are "
                        "skipped, never dispatched nor dead-lettered")
        self.install_signals()
        try:
            while self.exit_code is None:
                try:
                    self.step()
                except Exception:
                    self.errors.warning("supervisor loop: unexpected error; going on: %s",
                                        traceback.format_exc())
                    self.sleep()
            self.end_watcher()
        finally:
            if self.workers or self.watcher is not None:
                self.stop_now(ExitCode.RUNTIME if self.exit_code is None else self.exit_code)
        return self.exit_code

    def step(self) -> None:
        """One round: signals, the dead, the drain; then heartbeats, ownership, a HUP's
        roll and the worker count; then sleep."""
        self.last_loop = time.monotonic()
        while self.signals and self.exit_code is None:
            self.handle_signal(self.signals.pop(0))
        if self.exit_code is None:
            self.reap()
        if self.exit_code is None and self.draining_until is not None:
            self.check_drain()
        if self.exit_code is not None:  # QUIT, a boot failure or the end of a drain
            return
        if self.draining_until is None:
            self.check_heartbeats()
            self.check_ownership()
            self.roll()
            self.reconcile()
            self.notify_systemd()
        self.systemd.watchdog()
        self.sleep()

    def notify_systemd(self) -> None:
        """READY=1 once every worker has booted; STATUS= whenever the summary changes."""
        ready, problems = self.readiness()
        booted = len(self.workers) == self.target and all(
            h.heartbeat.status() != STARTING for h in self.workers.values())
        summary = (f"{self.target - len(problems)}/{self.target} workers ready"
                   + ("" if ready else f"; worker {min(problems)}: {problems[min(problems)]}"))
        if booted:
            self.systemd.ready(summary[:200])
        self.systemd.status(summary[:200])

    def sleep(self) -> None:
        try:
            ready, _, _ = select.select([self._pipe_r], [], [], LOOP_INTERVAL)
            if ready:
                while os.read(self._pipe_r, 64):
                    pass
        except (BlockingIOError, InterruptedError):
            pass

    def spawn(self, slot: int) -> None:
        """Fork a worker for ``slot``. Where that fails (no file descriptor left for its
        files, no process), the slot is tried again a little later; nothing is left
        open."""
        config, holding, quarantine = self.config, Holding(), self.suspects.quarantine()
        rate_limit = self.rate_limit
        try:
            pid, heartbeat = self._fork(
                f"ingestd-w{slot}",
                lambda beat, early: run_worker(config, slot, beat, early, holding, quarantine,
                                               rate_limit))
        except OSError as exc:
            holding.close()
            self.next_spawn[slot] = time.monotonic() + MAX_RESTART_BACKOFF / 10
            log.error("worker %d cannot start: %s; trying again", slot, exc)
            return
        self.workers[slot] = WorkerHandle(slot, pid, heartbeat, holding,
                                          generation=self.generation)
        log.info("worker %d started (pid %d)", slot, pid)

    def spawn_watcher(self) -> None:
        config = self.config
        pid, heartbeat = self._fork(WATCHER_NAME, lambda beat, _early: run_watcher(config, beat))
        self.watcher = WorkerHandle(WATCHER, pid, heartbeat)

    def _fork(self, name: str,
              main: Callable[[Heartbeat, list[int]], int]) -> tuple[int, Heartbeat]:
        """Fork a child named ``name`` that runs ``main`` with signals as a worker needs
        them."""
        heartbeat = Heartbeat()
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            heartbeat.close()
            raise
        if pid == 0:  # the child
            code: int = ExitCode.RUNTIME
            try:
                _child_of(parent, name)
                for sig in HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                # Meant for the supervisor; `systemctl kill` sends them to every process.
                # A worker installs its REJOIN handler when it runs.
                for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, REJOIN):
                    signal.signal(sig, signal.SIG_IGN)
                # Until the worker installs its own handlers, a stop is only noted:
                # a worker still booting must not die of the TERM of a drain.
                early: list[int] = []
                for sig in STOPS:
                    signal.signal(sig, lambda signum, _frame: early.append(signum))
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
                if os.getppid() != parent:  # see _child_of
                    os.kill(os.getpid(), signal.SIGTERM)
                code = main(heartbeat, early)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        return pid, heartbeat

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.watcher is not None and pid == self.watcher.pid:
                self._watcher_exited(status)
                continue
            handle = next((h for h in self.workers.values() if h.pid == pid), None)
            if handle is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            with self.lock:
                del self.workers[handle.slot]
                never_beat = handle.heartbeat.status() == STARTING
                handle.heartbeat.close()
            if handle.holding is not None:
                # A crash, or the kill of a stuck loop; not a stop ingestd asked for.
                asked = handle.stopping_since is not None or self.draining_until is not None
                if (code < 0 or code == ExitCode.RUNTIME) and (handle.stuck or not asked):
                    self.quarantine(handle.slot, handle.holding.held())
                handle.holding.close()
            _mark_dead(pid)
            if handle.stuck:  # killed by check_heartbeats, replaced at once
                self.count_restart(handle.slot)
            if handle.stopping_since is not None or self.draining_until is not None:
                log.info("worker %d (pid %d) exited with %d", handle.slot, pid, code)
                if self.draining_until is not None and code != ExitCode.OK:
                    self.drain_failed = True
                continue
            if code == ExitCode.BOOT or code == ExitCode.CONFIG:
                log.error("worker %d could not boot (exit %d); stopping", handle.slot, code)
                self.stop_now(ExitCode.BOOT)
                return
            self.failures[handle.slot] = self.failures.get(handle.slot, 0) + 1 if never_beat else 1
            if self.failures[handle.slot] >= BOOT_FAILURES_LIMIT:
                log.error("worker %d died %d times in a row before it ran; stopping",
                          handle.slot, self.failures[handle.slot])
                self.stop_now(ExitCode.BOOT)
                return
            quick = time.monotonic() - handle.started < QUICK_DEATH
            self.quick_deaths[handle.slot] = self.quick_deaths.get(handle.slot, 0) + 1 if quick \
                else 0
            streak = max(self.failures[handle.slot], self.quick_deaths[handle.slot])
            delay = min(MAX_RESTART_BACKOFF, 0.5 * 2 ** (streak - 1))
            self.next_spawn[handle.slot] = time.monotonic() + delay
            self.count_restart(handle.slot)
            log.warning("worker %d (pid %d) died (%s); restarting in %.1fs", handle.slot, pid,
                        _describe_exit(code), delay)

    def count_restart(self, slot: int) -> None:
        """A worker of ``slot`` is replaced after it died or was killed as stuck: for
        /readyz and ``ingestd_worker_restarts_total``."""
        self.restarts[slot] = self.restarts.get(slot, 0) + 1
        _count_restart()

    def quarantine(self, slot: int, held: list[Range]) -> None:
        """A worker died holding these records: those that killed a worker before too are
        dead-lettered by every worker started from now on."""
        for poison in self.suspects.died_holding(held):
            log.error("worker %d died twice while it held %s: workers started from now on "
                      "send those records to the dead-letter topic as internal", slot, poison)

    def _watcher_exited(self, status: int) -> None:
        assert self.watcher is not None
        code = os.waitstatus_to_exitcode(status)
        if self.watcher.stopping_since is None and self.draining_until is None:
            log.warning("ownership watcher (pid %d) died (%s); restarting in %.0fs",
                        self.watcher.pid, _describe_exit(code), WATCHER_RESTART)
        with self.lock:
            self.watcher.heartbeat.close()
            pid, self.watcher = self.watcher.pid, None
        _mark_dead(pid)
        self.next_watcher = time.monotonic() + WATCHER_RESTART

    def end_watcher(self, grace: float = 2.0) -> None:
        """At exit: the watcher was asked to stop when the drain began; wait a moment."""
        if self.watcher is None:
            return
        self.stop_watcher()
        deadline = time.monotonic() + grace
        while self.watcher is not None and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        if self.watcher is not None:
            self.stop_now(self.exit_code or ExitCode.OK)

    def stop_watcher(self) -> None:
        if self.watcher is not None and self.watcher.stopping_since is None:
            self.watcher.stopping_since = time.monotonic()
            _kill(self.watcher.pid, signal.SIGTERM)

    def check_ownership(self) -> None:
        """Classic protocol: while the watcher reports partitions without an owner, ask one
        ready worker to rejoin the group, which makes the group hand them out again. (The
        consumer protocol reconciles on the broker; nothing to do there.)"""
        if (self.watcher is None or self.config.group_protocol != "classic"
                or self.watcher.heartbeat.status() in (READY, STARTING)
                or time.monotonic() < self.next_rejoin):
            return
        ready = [h for slot, h in sorted(self.workers.items()) if h.stopping_since is None
                 and h.heartbeat.status() == READY]
        if ready:
            log.warning("partitions without an owner: asking worker %d to rejoin the group",
                        ready[0].slot)
            _kill(ready[0].pid, REJOIN)
            self.next_rejoin = time.monotonic() + REJOIN_INTERVAL

    def check_heartbeats(self) -> None:
        watcher = self.watcher
        if watcher is not None and watcher.heartbeat.age() > self.config.worker_timeout:
            log.error("ownership watcher (pid %d) stuck: killing it", watcher.pid)
            _kill(watcher.pid, signal.SIGKILL)
        for handle in list(self.workers.values()):
            if handle.stopping_since is not None:
                if time.monotonic() - handle.stopping_since > self.config.drain_timeout:
                    _kill(handle.pid, signal.SIGKILL)
                continue
            if handle.heartbeat.age() > self.config.worker_timeout:
                log.error("worker %d (pid %d) stuck for %.0fs: killing it; its threads' "
                          "stacks follow", handle.slot, handle.pid, handle.heartbeat.age())
                _kill(handle.pid, signal.SIGABRT)
                handle.stuck = True
                _count_stuck_kill()
                handle.stopping_since = time.monotonic() - self.config.drain_timeout + 5
                self.next_spawn[handle.slot] = 0.0

    def reconcile(self) -> None:
        now = time.monotonic()
        for slot in range(self.target):
            if slot not in self.workers and now >= self.next_spawn.get(slot, 0.0):
                self.spawn(slot)
        for slot, handle in list(self.workers.items()):
            if slot >= self.target and handle.stopping_since is None:
                log.info("stopping worker %d (pid %d)", slot, handle.pid)
                handle.stopping_since = now
                _kill(handle.pid, signal.SIGTERM)
        if (self.config.assignment == "group" and self.config.group_type == "classic"
                and self.watcher is None and now >= self.next_watcher):
            self.spawn_watcher()
        _set_alive(len(self.workers))

    def drain(self) -> None:
        if self.draining_until is not None:
            return
        log.info("draining %d workers (up to %.0fs)", len(self.workers), self.config.drain_timeout)
        self.draining_until = time.monotonic() + self.config.drain_timeout
        self.systemd.stopping()
        self.stop_watcher()
        for handle in self.workers.values():
            handle.stopping_since = time.monotonic()
            _kill(handle.pid, signal.SIGTERM)

    def check_drain(self) -> None:
        assert self.draining_until is not None
        if not self.workers:
            log.info("stopped" if not self.drain_failed else "stopped; a worker did not drain")
            self.exit_code = ExitCode.RUNTIME if self.drain_failed else ExitCode.OK
        elif time.monotonic() > self.draining_until:
            log.error("drain timeout: killing %d workers", len(self.workers))
            self.stop_now(ExitCode.RUNTIME)

    def stop_now(self, code: int = ExitCode.OK) -> None:
        handles = [*self.workers.values(), *([self.watcher] if self.watcher else [])]
        for handle in handles:
            _kill(handle.pid, signal.SIGKILL)
        for handle in handles:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(handle.pid, 0)
            _mark_dead(handle.pid)
        self.workers.clear()
        self.watcher = None
        self.exit_code = code

    def resize(self, target: int) -> None:
        """TTIN / TTOU. In static mode every worker's share depends on the count,
        so all of them are replaced; in group mode the group rebalances."""
        self.target = max(1, target)
        self.config = dataclasses.replace(self.config, workers=self.target)
        log.info("workers now %d", self.target)
        if self.config.assignment == "static":
            for handle in self.workers.values():
                if handle.stopping_since is None:
                    handle.stopping_since = time.monotonic()
                    _kill(handle.pid, signal.SIGTERM)

    def reload(self) -> None:
        """HUP: re-read the configuration, then replace the workers one at a time."""
        try:
            loaded = self.reload_config()
        except IngestdError as exc:
            log.error("HUP: configuration not reloaded: %s", exc)
            return
        log.info("HUP: configuration reloaded; replacing workers one at a time")
        self.config = loaded.config
        if self.config.max_rate != self.rate_limit.rate:
            self.rate_limit.configure(self.config.max_rate)
            _set_max_rate(self.config.max_rate)
        self.stop_watcher()  # restarted with the new configuration
        self.target = self.config.workers
        self.generation += 1
        self.rolling = sorted(slot for slot in self.workers if slot < self.target)

    def roll(self) -> None:
        """One step of a HUP: stop the next old worker; move on once its successor booted."""
        while self.rolling:
            slot = self.rolling[0]
            handle = self.workers.get(slot)
            if handle is None:
                return  # reconcile() starts its successor
            if handle.generation < self.generation:
                if handle.stopping_since is None:
                    handle.stopping_since = time.monotonic()
                    _kill(handle.pid, REPLACE)
                return
            if handle.heartbeat.status() == STARTING:
                return
            self.rolling.pop(0)

    # --- read by the HTTP server ------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Ready when every worker is alive, beating and assigned with a reachable broker."""
        with self.lock:
            problems = {str(slot): state for slot in range(self.target)
                        if (state := self._state(self.workers.get(slot))) != READY}
            ownership = self.watcher.heartbeat.status() if self.watcher else READY
        if ownership not in (READY, STARTING):
            problems["partitions"] = ownership
        return not problems and self.draining_until is None, problems

    def detail(self) -> dict[str, Any]:
        """Every slot's process and state, for /readyz?verbose and ``ingestd status``."""
        now = time.monotonic()
        slots = []
        with self.lock:
            for slot in range(max(self.target, max(self.workers, default=-1) + 1)):
                handle = self.workers.get(slot)
                state = "stopping" if handle and handle.stopping_since is not None \
                    else self._state(handle)
                slots.append({"slot": slot, "pid": handle.pid if handle else None,
                              "state": state, "restarts": self.restarts.get(slot, 0),
                              "uptime_seconds": round(now - handle.started, 1) if handle
                              else None})
        return {"target": self.target, "draining": self.draining_until is not None,
                "group_type": self.config.group_type, "max_rate": self.config.max_rate,
                "rate_limited": self.config.max_rate > 0 and self.rate_limit.debt() > 0,
                "workers": slots}

    def _state(self, handle: WorkerHandle | None) -> str:
        """A worker's status line (``ready``, or why not). Called with :attr:`lock` held:
        the HTTP thread must not read a heartbeat that the loop closes."""
        if handle is None:
            return "not running"
        age = handle.heartbeat.age()
        if age > self.config.worker_timeout:
            return f"no heartbeat for {age:.0f}s"
        return handle.heartbeat.status()

    def alive(self) -> bool:
        return time.monotonic() - self.last_loop < 10 * LOOP_INTERVAL + 5


def _child_of(parent: int, name: str) -> None:
    """Name the process (``ps -o comm``), and have the kernel send it TERM when the
    supervisor dies, whatever killed it (even SIGKILL or the OOM killer), so that no
    worker consumes on as an orphan. A child whose supervisor died before this call
    sends itself TERM once its handlers are set (see :meth:`Supervisor._fork`)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15])
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run_worker(config: Config, slot: int, heartbeat: Heartbeat, early: list[int],
               holding: Holding | None = None, quarantine: Quarantine | None = None,
               rate_limit: RateLimit | None = None) -> int:
    """The worker process's main; returns its exit code. ``holding`` is told which
    records the worker holds, up to an exit ingestd meant."""
    logs.configure(config.log_format, config.log_level, role="worker", slot=slot)
    # The SIGABRT of a stuck worker (check_heartbeats) prints every thread's stack.
    faulthandler.enable(all_threads=True)
    # imported after fork: librdkafka is not fork-safe
    from ingestd.worker.loop import Worker
    from ingestd.worker.share import ShareWorker

    worker: Worker | ShareWorker
    try:
        if config.group_type == "share":  # a record's deliveries guard it, not quarantine
            worker = ShareWorker(config, slot, heartbeat.beat, rate_limit)
        else:
            worker = Worker(config, slot, heartbeat.beat, holding, quarantine, rate_limit)
    except Exception as exc:
        log.error("worker %d cannot boot: %s", slot, exc,
                  exc_info=not isinstance(exc, IngestdError))
        return ExitCode.BOOT
    try:
        worker.run(early)
    except IngestdError as exc:
        log.error("%s", exc)
        if holding is not None:  # not the records' fault
            holding.hold([])
        return int(exc.exit_code)
    except Exception:
        log.exception("worker crashed")
        return ExitCode.RUNTIME
    return ExitCode.OK


def run_watcher(config: Config, heartbeat: Heartbeat) -> int:
    """The ownership watcher's main (group mode); returns its exit code."""
    logs.configure(config.log_format, config.log_level, role="watcher")
    from ingestd.supervisor.owners import (
        Watcher,  # imported after fork: librdkafka is not fork-safe
    )

    try:
        Watcher(config, heartbeat.beat).run()
    except Exception:
        log.exception("ownership watcher crashed")
        return ExitCode.RUNTIME
    return ExitCode.OK


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _mark_dead(pid: int) -> None:
    from ingestd import metrics

    metrics.archive_dead_process(pid)


def _count_restart() -> None:
    from ingestd import metrics

    metrics.worker_restarts.inc()


def _count_stuck_kill() -> None:
    from ingestd import metrics

    metrics.stuck_kills.inc()


def _set_max_rate(rate: float) -> None:
    from ingestd import metrics

    metrics.max_rate.set(rate)


def _set_alive(n: int) -> None:
    from ingestd import metrics

    metrics.workers_alive.set(n)
