"""Turning etcd's authentication on: a root user, and a fleet user confined to one key prefix.

Done once per data directory by `tandem infra up --secure`, as `etcdctl user add`,
`role grant-permission --prefix` and `auth enable` would; through the API, so that no
password appears on a command line.
"""

from __future__ import annotations

import logging

import etcd3aio
import grpc.aio
from etcd3aio.auth import AuthService, PermissionType

from app.runtime.connect import etcd_service

log = logging.getLogger(__name__)

_TIMEOUT_S = 5.0
# etcd's own name for the role that may do everything, auth included.
_ROOT = "root"


async def _enabled(auth: AuthService, root_password: str) -> bool:
    """Whether auth is on already (an etcd restarted on its data dir). Once it is, etcd answers
    only users, auth_status included: so ask by authenticating as root."""
    try:
        await auth.authenticate(_ROOT, root_password, timeout=_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        if "authentication is not enabled" in (exc.details() or ""):
            return False
        raise
    return True


async def enable_etcd_auth(
    endpoint: str, ca_cert: bytes, root_password: str, user: str, password: str, prefix: str
) -> None:
    """On the etcd at `endpoint` (host:port, TLS with `ca_cert`): unless auth is on already,
    add `root` and `user`, give `user` a role of its own name that may read and write the
    keys under `prefix` only, and turn auth on."""
    host = endpoint.rpartition(":")[0]
    client = etcd3aio.Etcd3Client([endpoint], ca_cert=ca_cert, tls_server_name=host)
    await client.connect()
    try:
        auth = etcd_service(client.auth)
        if await _enabled(auth, root_password):
            return
        users = set((await auth.user_list(timeout=_TIMEOUT_S)).users)
        roles = set((await auth.role_list(timeout=_TIMEOUT_S)).roles)
        for name, secret in ((_ROOT, root_password), (user, password)):
            if name not in users:
                await auth.user_add(name, secret, timeout=_TIMEOUT_S)
            if name not in roles:
                await auth.role_add(name, timeout=_TIMEOUT_S)
            await auth.user_grant_role(name, name, timeout=_TIMEOUT_S)
        await auth.role_grant_permission(
            user,
            prefix,
            etcd3aio.prefix_range_end(prefix.encode()),
            perm_type=PermissionType.READWRITE,
            timeout=_TIMEOUT_S,
        )
        await auth.auth_enable(timeout=_TIMEOUT_S)
        log.info("etcd: auth enabled; user %s may use %s* only", user, prefix)
    finally:
        await client.close()
