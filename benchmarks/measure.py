"""What the end-to-end benchmarks read from ``/proc``: CPU and peak RSS of a process
tree (ingestd's supervisor and its children, or one alternative pipeline)."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def tree(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of ``pid`` and its live descendants, and of the children
    they already reaped."""
    total = 0
    for p in tree(pid):
        try:
            f = _stat(p)
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # utime stime cutime cstime
    return total / TICK


def peak_rss_mb(pid: int) -> float:
    """The largest peak RSS (VmHWM) of one process in the tree."""
    peak = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return round(peak / 1024, 1)


# What a thread is, for the split of a pipeline's CPU (:func:`cpu_by_role`).
ROLES = ("the supervisor", "the loop's thread", "librdkafka's threads",
         "the publishing and other threads")


def cpu_by_role(pid: int) -> dict[str, float]:
    """User plus system CPU seconds of the live threads of ``pid``'s tree, by role:
    ``pid``'s own main thread is the supervisor's, a child's main thread its loop, a
    thread librdkafka named (``rdk:``) librdkafka's; the rest (the in-flight publisher,
    the metrics server) are the others."""
    out = dict.fromkeys(ROLES, 0.0)
    for p in tree(pid):
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                text = (task / "stat").read_text()
            except OSError:
                continue
            comm = text[text.index("(") + 1:text.rindex(")")]
            f = text[text.rindex(")") + 2:].split()
            if comm.startswith("rdk:"):
                role = ROLES[2]
            elif int(task.name) == p:
                role = ROLES[0] if p == pid else ROLES[1]
            else:
                role = ROLES[3]
            out[role] += (int(f[11]) + int(f[12])) / TICK
    return out
