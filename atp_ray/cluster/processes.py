"""Ray node processes started from here: free ports, a node started in its own session, and
stopping a session by its pids (never ``ray stop``, which kills every Ray process on the host)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from atp_ray.errors import ClusterError


def free_ports(count: int) -> list[int]:
    """Ports the OS calls free now (held open together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_node(argv: list[str], log: Path, env: dict[str, str], timeout_s: float) -> int:
    """Start ``ray start --block`` in its own session; returns its pid once the node is up."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_session(proc.pid)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ClusterError(f"a local Ray node did not start (log {log}):\n{tail}")
        time.sleep(0.5)
    return proc.pid


def session_members(sid: int) -> list[int]:
    """Processes of session ``sid`` (the session a node's ``ray start`` opened), from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session ...
            members.append(int(stat.parent.name))
    return members


def is_node_leader(pid: int) -> bool:
    """Is ``pid`` still a ``ray start`` that leads its own session (not a reused pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return bool(pid) and bool(session_members(pid))  # the leader is gone; stragglers may remain
    return os.getsid(pid) == pid and b"start" in cmdline and any(part.endswith(b"ray") for part in cmdline)


def stop_session(pid: int, grace_s: float = 20) -> None:
    """Stop a process we started in its own session, then anything left in that session.

    ``ray start --block`` shuts its node down on SIGTERM; stragglers (workers, forked
    dashboard modules) share its session id and are killed by pid. Never ``ray stop``:
    that kills every Ray process on the host.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not session_members(pid):
            return
        time.sleep(0.5)
    for member in session_members(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    deadline = time.monotonic() + 5  # until the killed are reaped (the leader by us, if it is our child)
    while session_members(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
