"""Runs a document's commands the way a user types them into a terminal.

`DocShell` is that terminal: each command is run by bash in the repository root (or a
node's working directory), and what a command exports the next one sees, as in one
shell session (variables that are not exported do not carry over: documents export what
later commands use). A command that stays in the foreground (`tandem serve`, `make run`)
is started in the background, in a session of its own, and waited for by the test; every
other command must exit 0. `<placeholder>`s are replaced by the values the test gives,
and only where the document shows one.

On a `tests.netns` node the commands run in the node's network namespace; the long-running
ones also in a private PID/IPC namespace with their own /dev/shm, as on a separate host.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from testbed.graphs import stop_process_tree
from tests.docs.blocks import REPO, Command
from tests.netns import Node, NodeProcess

# Variables this test process may hold (the conftests set some) that a user following a
# document does not have: where a document needs one, it exports it.
_TEST_PROCESS_ONLY = ("NATS_SERVER", "ETCD_", "TANDEM_", "VLLM_", "UCX_", "RAY_")
# What bash adds to the environment it reports, which is no export of the document's.
_SHELL_OWN = {"_", "PWD", "OLDPWD", "SHLVL"}
# Commands that stay in the foreground until stopped: run in the background and waited for.
LONG_RUNNING = ("tandem serve", "tandem ray head", "tandem ray worker", "make run", "make logs")


def user_environment(**extra: str) -> dict[str, str]:
    """A fresh terminal's environment: this process's, less Tandem's and vLLM's variables."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(_TEST_PROCESS_ONLY)}
    return {**env, **extra}


def is_long_running(command: Command) -> bool:
    return any(command.starts_with(prefix) for prefix in LONG_RUNNING) and "--dry-run" not in command.words


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Background:
    """A long-running command of a document, started by `DocShell.start`."""

    def __init__(self, command: Command, process: subprocess.Popen[bytes] | NodeProcess, log_path: Path) -> None:
        self.command = command
        self.log_path = log_path
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    def poll(self) -> int | None:
        return self._process.poll()

    def interrupt(self, timeout: float = 120.0) -> int:
        """Ctrl-C, as in the terminal the document has it run in: SIGINT to its process
        group; its exit status once it and everything it started have stopped."""
        assert isinstance(self._process, subprocess.Popen), "interrupt() is for commands run on this machine"
        tree: list[psutil.Process] = []
        if self._process.poll() is None:
            tree = psutil.Process(self._process.pid).children(recursive=True)  # before its orphans leave it
            os.killpg(self._process.pid, signal.SIGINT)
        try:
            status = self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            message = f"{self.command} did not stop within {timeout}s of Ctrl-C:\n{self.log_tail()}"
            raise AssertionError(message) from None
        survivors = [process for process in tree if _alive(process)]
        for process in survivors:
            process.kill()
        left = [process.pid for process in survivors]
        assert not survivors, f"{self.command} left {left} running after Ctrl-C (killed now):\n{self.log_tail()}"
        return status

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of what outlives it (its whole tree, or its node's PID namespace)."""
        if isinstance(self._process, NodeProcess):
            self._process.stop(timeout=90)
        else:
            stop_process_tree(self._process)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.command} ({self.log_path})\n" + "\n".join(text.splitlines()[-lines:])


class DocShell:
    """One terminal of a user following a document (see the module docstring).

    `env` starts as `user_environment()` unless given, and holds what the commands export;
    `placeholders` maps a placeholder's name (`node1-ip` for `<node1-ip>`) to its value.
    Use it as a context manager: on exit every command it started is stopped, the last
    one first.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        cwd: Path = REPO,
        env: Mapping[str, str] | None = None,
        placeholders: Mapping[str, str] | None = None,
        node: Node | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.cwd = cwd
        self.env = dict(user_environment() if env is None else env)
        self.placeholders = dict(placeholders or {})
        self.node = node
        self.background: list[Background] = []
        log_dir.mkdir(parents=True, exist_ok=True)
        self._transcript = log_dir / "transcript.log"
        self._env_file = log_dir / "env-after-command"

    def __enter__(self) -> DocShell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        while self.background:
            self.background.pop().stop()

    def execute(self, command: Command, timeout: float = 300.0) -> str | Background:
        """`start` a long-running command, `run` any other."""
        return self.start(command) if is_long_running(command) else self.run(command, timeout)

    def run(self, command: Command, timeout: float = 300.0) -> str:
        """Run a command to its end; it must exit 0. Returns its standard output."""
        command = command.substituted(self.placeholders)
        self._env_file.unlink(missing_ok=True)
        # Its exports are read back after it, so that the next command sees them.
        script = f'{command.text}\n__status=$?\nenv -0 > "{self._env_file}"\nexit $__status\n'
        argv = ["bash", "-c", script]
        kwargs: dict[str, Any] = {
            "env": self.env,
            "cwd": self.cwd,
            "capture_output": True,
            "text": True,
            "timeout": timeout,
        }
        try:
            result = self.node.run(argv, **kwargs) if self.node else subprocess.run(argv, **kwargs)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{command}\ndid not finish within {timeout}s:\n{self.background_tails()}") from exc
        with self._transcript.open("a") as transcript:
            transcript.write(f"$ {command.text}\n{result.stdout}{result.stderr}[exit {result.returncode}]\n")
        if result.returncode != 0:
            raise AssertionError(
                f"{command}\nexited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n"
                f"{self.background_tails()}"
            )
        if self._env_file.exists():
            pairs = (entry.split("=", 1) for entry in self._env_file.read_text().split("\0") if "=" in entry)
            self.env = {name: value for name, value in pairs if name not in _SHELL_OWN}
        return result.stdout

    def check(self, text: str, timeout: float = 300.0) -> str:
        """Run a command of the test's own (a check between the document's) in this shell."""
        return self.run(Command(text, 0, "(the test)"), timeout)

    def start(self, command: Command) -> Background:
        """Start a long-running command in the background, its output in a log of its own."""
        command = command.substituted(self.placeholders)
        slug = re.sub(r"[^a-z0-9]+", "-", " ".join(command.program[:3]).lower()).strip("-")
        log_path = self.log_dir / f"{len(self.background):02d}-{slug}.log"
        argv = ["bash", "-c", command.text]
        with log_path.open("ab") as log:
            if self.node:
                process: subprocess.Popen[bytes] | NodeProcess = self.node.popen(
                    argv, private=True, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT
                )
            else:
                # A session of its own: stopped by its PID (and its group, for Ctrl-C), never by name.
                process = subprocess.Popen(
                    argv, start_new_session=True, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT
                )
        started = Background(command, process, log_path)
        self.background.append(started)
        return started

    def assert_running(self) -> None:
        for started in self.background:
            assert started.poll() is None, f"{started.command}\nexited {started.poll()}:\n{self.background_tails()}"

    def background_tails(self, lines: int = 40) -> str:
        return "\n".join(started.log_tail(lines) for started in self.background)

    def wait_http(self, url: str, timeout: float) -> None:
        """Until `url` answers 200 (a Frontend's /health: a model is served), while the started
        commands run. From this machine: on a node, `url` must name the node's own address."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.assert_running()
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:  # refused while it starts; HTTPError (a 503) is one too
                pass
            time.sleep(1.0)
        raise AssertionError(f"{url} not ready after {timeout}s\n{self.background_tails()}")


# --- reading what curl printed -----------------------------------------------------------


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # names in lower case
    body: str


def http_response(curl_output: str) -> HttpResponse:
    """The response `curl -i` printed, past any interim `100 Continue` (which older curls
    ask for before sending a body over 1 KiB). Line ends as read in text mode: LF."""
    rest = curl_output.replace("\r\n", "\n")
    while True:
        head, separator, rest = rest.partition("\n\n")
        assert separator, f"no HTTP response head in curl's output:\n{curl_output[:2000]}"
        status_line, *header_lines = head.split("\n")
        status = int(status_line.split()[1])
        if status >= 200:
            break
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpResponse(status, headers, rest)


def sse_data(body: str) -> Iterator[str]:
    """The `data:` payloads of a Server-Sent Events stream, in order."""
    for line in body.splitlines():
        if line.startswith("data:"):
            yield line[len("data:") :].strip()
