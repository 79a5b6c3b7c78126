"""Discovery plane: the records processes keep in etcd (key layout in app/protocol/names.py).

Instance and model records hang on their process's lease and vanish with it.
"""

from __future__ import annotations

from typing import Any

import msgspec


class InstanceRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One served endpoint of one process: `/tandem/<ns>/instances/<service>/<endpoint>/<id>`.

    `draining`: the process is stopping; it finishes the calls it has and takes no new
    ones (callers pick other instances; calls in flight go on, as the record stays).
    """

    namespace: str
    service: str
    endpoint: str
    instance_id: str
    subject: str
    host: str
    pid: int
    metadata: dict[str, Any] = {}
    draining: bool = False


class ProcessRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One service process, endpoints or none (a Frontend serves only HTTP):
    `/tandem/<ns>/processes/<instance_id>`, on the process lease.

    What `tandem status` lists; `started_at` is wall-clock seconds (the uptime it shows).
    The versions and the side channel are what `tandem doctor` checks ("": not said, a
    process of an older Tandem, or none).
    """

    instance_id: str
    service: str
    replica: int
    host: str
    pid: int
    started_at: float
    endpoints: list[str] = []
    tandem_version: str = ""
    vllm_version: str = ""  # the vLLM installed where the process runs, engine or none
    # HOST:PORT where this process's engine listens for NIXL handshakes (vLLM's
    # VLLM_NIXL_SIDE_CHANNEL_HOST/PORT): what a decode engine dials to pull a prefill's KV.
    nixl_side_channel: str = ""


class ModelRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A model some instance serves: `/tandem/<ns>/models/<name>/<instance_id>`.

    `metadata` is the worker's `ModelInfo`, as builtins.
    """

    name: str
    instance_id: str
    service: str
    endpoint: str
    metadata: dict[str, Any] = {}


class ModelInfo(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What a worker tells the fleet about the model it serves (the model record's metadata)."""

    name: str
    max_model_len: int
    block_size: int
    model_path: str = ""  # where the tokenizer and chat template are read from
    # How router replicas key the blocks of this worker's KV events (events.KV_HASH_SCHEME
    # of the worker's build; "": a worker of an older Tandem).
    kv_hash_scheme: str = ""
