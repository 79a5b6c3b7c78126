"""Whether a process runs, stopping one by its PID (never by name), and dying with a parent."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when its parent dies, by SIGKILL too
    (Linux's PR_SET_PDEATHSIG; it holds across exec). Call it in the child, from a process
    whose parent forked it from its main thread: the signal comes when that thread ends."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)  # the parent died before the call: no signal would come
