"""Whether a process runs, stopping one by its PID (never by name), and dying with a parent."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

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


# What `with_parent_death_signal` runs: die_with_parent's steps, in a fresh interpreter that
# then becomes the program (PR_SET_PDEATHSIG holds across exec).
_EXEC_WITH_PDEATHSIG = """\
import ctypes, os, signal, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
    sys.exit("prctl(PR_SET_PDEATHSIG) failed: errno " + str(ctypes.get_errno()))
if os.getppid() != parent:
    os.kill(os.getpid(), signal.SIGTERM)
os.execvp(argv[0], argv)
"""


def with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """`argv`, started so that the kernel sends it SIGTERM when this process dies (by
    SIGKILL too), as die_with_parent does, but without a `preexec_fn`.

    A `preexec_fn` runs Python in the forked child before its exec, with the interpreter's
    after-fork hooks: in a process where gRPC (the etcd client) has run, gRPC's fork handling
    then failed in the child now and then ("epoll_wait error: Bad file descriptor") and the
    child died by SIGABRT before it became the program. Without one, subprocess spawns the
    child with vfork: nothing runs between fork and exec. Call it from the main thread (the
    signal comes when the thread that started the child ends).
    """
    return [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *argv]


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
