"""Check `nixl-side-channels`: every PrefillWorker's NIXL side channel accepts connections.

A decode engine pulls a prefill's KV after a handshake on the prefill engine's side
channel (the HOST:PORT its process record advertises). Unreachable (a firewall, a wrong
advertised address), every remote prefill fails after a timeout and the decode worker
prefills locally: slower, and silent. The doctor opens a real TCP connection to each side
channel, from its own node: a decode node behind another firewall is checked by running
the doctor there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress

from app.doctor.check import Check, Fleet, failed, not_applicable, passed
from app.protocol import ProcessRecord, names

NAME = "nixl-side-channels"


async def tcp_connect(host: str, port: int, timeout_s: float) -> str | None:
    """None if a TCP connection opens within `timeout_s` (then closed at once), else why not."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except TimeoutError:
        return f"no answer within {timeout_s:g}s (a firewall dropping it?)"
    except OSError as exc:
        return exc.strerror or str(exc)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


def _split(channel: str) -> tuple[str, int] | None:
    host, _, port = channel.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _local_only(host: str) -> bool:
    """An address no other node can dial (loopback, or the any-address, which vLLM also hands out)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


async def check_side_channels(fleet: Fleet, timeout_s: float = 2.0) -> Check:
    prefill = sorted(fleet.of_service(names.PREFILL_WORKER), key=lambda p: p.instance_id)
    if not prefill:
        return not_applicable(NAME, "no PrefillWorker: no KV crosses between engines")
    advertising = [p for p in prefill if p.nixl_side_channel]
    if not advertising:
        return not_applicable(
            NAME,
            "no PrefillWorker advertises a NIXL side channel (the mocker engine, or a Tandem before `tandem doctor`)",
        )
    decode_hosts = {p.host for p in fleet.of_service(names.VLLM_WORKER)}
    problems: list[str] = []
    dialed: list[tuple[ProcessRecord, str, int]] = []
    for process in advertising:
        split = _split(process.nixl_side_channel)
        where = fleet.where(process.instance_id)
        if split is None:
            problems.append(f"PrefillWorker {where} advertises {process.nixl_side_channel!r}, not HOST:PORT")
            continue
        host, port = split
        remote_decoders = sorted(decode_hosts - {process.host})
        if _local_only(host) and remote_decoders:
            problems.append(
                f"PrefillWorker {where} advertises side channel {process.nixl_side_channel}, "
                f"which decode workers on {', '.join(remote_decoders)} cannot reach: leave VLLM_NIXL_SIDE_CHANNEL_HOST "
                "unset (it defaults to the node's advertised address) or set it to the node's routable address"
            )
            continue
        dialed.append((process, host, port))
    results = await asyncio.gather(*(tcp_connect(host, port, timeout_s) for _p, host, port in dialed))
    for (process, host, port), why in zip(dialed, results, strict=True):
        if why is not None:
            problems.append(
                f"PrefillWorker {fleet.where(process.instance_id)}: its NIXL side channel {host}:{port} is unreachable "
                f"from this node ({fleet.doctor_host}): {why}. Open TCP port {port} on {process.host} to the decode "
                "nodes, or correct the address it advertises (VLLM_NIXL_SIDE_CHANNEL_HOST, TANDEM_ADVERTISE_HOST)"
            )
    if problems:
        return failed(NAME, problems)
    return passed(
        NAME,
        f"{len(dialed)} side channel(s) accept TCP connections, checked from this node ({fleet.doctor_host}), not "
        "from each decode node: run `tandem doctor` on every decode node to check from there",
    )
