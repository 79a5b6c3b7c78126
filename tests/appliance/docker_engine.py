"""A private Docker engine for the appliance tests: dockerd as a child process of the test run.

No Docker engine runs on these machines and none may be shared, so the tests start their own
(docs/appliance.md, "Tested here"): no bridge network (host networking only), no iptables changes, and its own
data root, exec root, pidfile and unix socket, so it never meets another engine on the
same machine. It is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import psutil

from testbed.graphs import stop_process_tree
from tests.debian_packages import MissingPackagesError, install_missing

# Debian's docker.io CLI. /usr/local/bin/docker on these machines is a newer CLI without
# the buildx plugin, which has no BuildKit at all; Debian's 20.10 CLI has it built in.
DOCKER_CLI = "/usr/bin/docker"
# command -> Debian package that provides it
PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}


class DockerEngineError(RuntimeError):
    pass


def install_missing_packages() -> None:
    """apt-get install what the tier needs (docker.io, docker-compose 1.29, debootstrap)."""
    try:
        install_missing(PACKAGES, also=set() if Path(DOCKER_CLI).exists() else {"docker.io"})
    except MissingPackagesError as error:
        raise DockerEngineError(str(error)) from None


class DockerEngine:
    """dockerd with its own state; `host` is the DOCKER_HOST of its socket.

    `data_root` holds images and the build cache: keep it between runs to keep the image's
    layers. `run_dir` (exec root, pidfile, socket, log) is the caller's temporary folder.
    """

    def __init__(self, data_root: Path, run_dir: Path) -> None:
        self.data_root = data_root
        self.run_dir = run_dir
        self.log_path = run_dir / "dockerd.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.run_dir / 'docker.sock'}"

    def env(self) -> dict[str, str]:
        """An environment whose docker, docker-compose and docker-py use this engine."""
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER": DOCKER_CLI}

    def start(self, timeout: float = 120.0) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        command = [
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            f"--data-root={self.data_root}",
            f"--exec-root={self.run_dir / 'exec'}",
            f"--pidfile={self.run_dir / 'dockerd.pid'}",
            f"--host={self.host}",
        ]
        with self.log_path.open("wb") as log:
            # Its own session: a Ctrl-C of the test run reaches the test, which stops it.
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise DockerEngineError(f"dockerd exited with {self._process.returncode}:\n{self.log_tail()}")
            probe = subprocess.run([DOCKER_CLI, "version"], env=self.env(), capture_output=True, timeout=30)
            if probe.returncode == 0:
                return
            time.sleep(0.5)
        self.stop()
        raise DockerEngineError(f"dockerd did not answer within {timeout:g}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM dockerd (it stops its containers and its containerd), then kill leftovers."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        stop_process_tree(process, timeout=timeout)
        # Container shims detach from dockerd; those of this engine name its exec root.
        exec_root = str(self.run_dir / "exec")
        for shim in psutil.process_iter(["cmdline"]):
            if any(exec_root in arg for arg in shim.info["cmdline"] or ()):
                with contextlib.suppress(psutil.NoSuchProcess):
                    shim.kill()
        self._unmount_leftovers()

    def _unmount_leftovers(self) -> None:
        """dockerd leaves its network namespace handle (exec root/netns/default) mounted."""
        prefix = f"{self.run_dir}/"
        for line in Path("/proc/mounts").read_text().splitlines():
            mountpoint = line.split()[1]
            if mountpoint.startswith(prefix):
                subprocess.run(["umount", "--lazy", mountpoint], capture_output=True, timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
