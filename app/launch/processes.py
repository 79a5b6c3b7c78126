"""Whether a process runs, and stopping one by its PID (never by name)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

STOP_TIMEOUT_S = 10.0


def pid_alive(pid: int) -> bool:
    """Whether the process runs; reaps it first when it is our exited child (a zombie)."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT_S, proc: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`. `proc` (when we are its
    parent) lets us reap it."""

    def gone() -> bool:
        if proc is not None:
            return proc.poll() is not None
        return not pid_alive(pid)

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if gone():
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(0.05)
