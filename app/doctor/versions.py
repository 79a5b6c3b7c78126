"""Check `versions`: one Tandem and one vLLM on every process of the fleet.

Two builds need not agree on the wire (fields are only ever added, but a new check or
field means nothing to an old peer), and two vLLM versions need not agree on KV layout
or NIXL's handshake: a node left on the previous image after an upgrade is the usual cause.
"""

from __future__ import annotations

from collections import Counter

from app.doctor.check import Check, Fleet, failed, not_applicable, passed
from app.protocol import ProcessRecord

NAME = "versions"

_FIELDS = (("Tandem", "tandem_version"), ("vLLM", "vllm_version"))


def check_versions(fleet: Fleet) -> Check:
    if not fleet.processes:
        return not_applicable(NAME, "no service process registered")
    problems, found = [], []
    for label, field in _FIELDS:
        by_version: dict[str, list[ProcessRecord]] = {}
        for process in fleet.processes:
            by_version.setdefault(getattr(process, field), []).append(process)
        if len(by_version) == 1:
            (version,) = by_version
            found.append(f"{label} {_shown(version)}")
            continue
        # The version most processes run is taken as the fleet's; the others are named.
        common = max(by_version, key=lambda v: (len(by_version[v]), v))
        others = "; ".join(
            f"{_shown(version)} on {_where(processes)}"
            for version, processes in sorted(by_version.items())
            if version != common
        )
        problems.append(f"{label} {_shown(common)} on {len(by_version[common])} process(es), but {others}")
    if problems:
        return failed(NAME, problems, "Install one version on every node (one image), then restart the odd ones")
    return passed(NAME, f"{' and '.join(found)} on all {len(fleet.processes)} processes")


def _where(processes: list[ProcessRecord]) -> str:
    by_host = Counter(p.host for p in processes)
    return ", ".join(
        f"{host} ({', '.join(f'{p.service} {p.instance_id}' for p in processes if p.host == host)})"
        for host in sorted(by_host)
    )


def _shown(version: str) -> str:
    return version or "unknown (a Tandem before `tandem doctor`)"
