"""Start `runtime_child.py` as a real separate process and stop it by PID."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from app.settings import RuntimeSettings

CHILD = Path(__file__).with_name("runtime_child.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


class Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, settings: RuntimeSettings, *args: str, lease_ttl_s: int = 2) -> Child:
        env = {
            **os.environ,
            "NATS_SERVER": settings.nats_server,
            "ETCD_ENDPOINTS": settings.etcd_endpoints,
            "TANDEM_NAMESPACE": settings.namespace,
            "TANDEM_LEASE_TTL_S": str(lease_ttl_s),
            "PYTHONPATH": str(REPO_ROOT),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), *args, env=env, stdout=asyncio.subprocess.PIPE
        )
        return cls(proc)

    async def read_line(self, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"child exited with {await self.proc.wait()}")
        return line.decode().strip()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
