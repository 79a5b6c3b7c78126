"""Every name on the wire: services, endpoints, event topics, queues, NATS subjects, etcd keys.

A process finds its peers by these names alone, so two builds that spell one differently
do not talk; keep them here and nowhere else. Service names are the `@service` class
names and endpoint names their method names (the SDK takes them from there);
tests/unit/protocol/test_names.py checks that the constants below still match.
"""

from __future__ import annotations

# --- services and their endpoints (the requests plane) ----------------------------------

FRONTEND = "Frontend"
PROCESSOR = "Processor"
ROUTER = "Router"
VLLM_WORKER = "VllmWorker"
PREFILL_WORKER = "PrefillWorker"

CHAT_COMPLETIONS = "chat_completions"  # Processor: OpenAI chat body -> StreamItems
COMPLETIONS = "completions"  # Processor: OpenAI completion body -> StreamItems
TOKENIZE = "tokenize"  # Processor: /tokenize body -> one dict {tokens, token_strs}
DETOKENIZE = "detokenize"  # Processor: /detokenize body -> one str
ROUTE = "route"  # Router: RouteRequest -> one RouteDecision
GENERATE = "generate"  # VllmWorker: PreprocessedRequest -> EngineOutputs
PREFILL_DONE = "prefill_done"  # VllmWorker: PrefillAnswer -> one bool
PREFILL_WANTED = "prefill_wanted"  # VllmWorker: PrefillWanted -> seconds it still waits (0: not)
KV_BLOCKS = "kv_blocks"  # VllmWorker: KvBlocksWanted -> KvEventBatches: a clear, then every block it caches
PREFILL_STATUS = "status"  # PrefillWorker: anything -> one dict of job counters

# --- event topics and work queues (the events plane) ------------------------------------

KV_EVENTS_TOPIC = "kv"  # KvEventBatch, from every VllmWorker
LOAD_TOPIC = "load"  # LoadReport, from every VllmWorker
PLACEMENT_TOPIC = "placement"  # PlacementMessage, among router replicas and Processors
ROUTER_REPORT_TOPIC = "router"  # RouterReport, from every router replica
PREFILL_QUEUE = "prefill_queue"  # PrefillJob, VllmWorkers -> PrefillWorkers (JetStream)

# --- NATS subjects ----------------------------------------------------------------------

SUBJECT_ROOT = "tandem"
# NATS's own convention for reply subjects; each process adds a random token.
INBOX_ROOT = "_INBOX"


def endpoint_subject(namespace: str, service: str, endpoint: str, instance_id: str) -> str:
    """Where one instance of an endpoint takes its calls."""
    return f"{SUBJECT_ROOT}.{namespace}.{service}.{endpoint}.{instance_id}"


def control_subject(subject: str) -> str:
    """Where a caller cancels a call it made to an endpoint's `subject`."""
    return f"{subject}.ctl"


def event_subject(namespace: str, topic: str) -> str:
    return f"{SUBJECT_ROOT}.{namespace}.events.{topic}"


def queue_subject(namespace: str, queue: str) -> str:
    return f"{SUBJECT_ROOT}.{namespace}.queue.{queue}"


def inbox_prefix(process_token: str) -> str:
    """The prefix of one process's reply subjects (one wildcard subscription takes them all)."""
    return f"{INBOX_ROOT}.{process_token}."


# --- etcd keys (the discovery plane) ----------------------------------------------------

ETCD_ROOT = f"/{SUBJECT_ROOT}/"


def namespace_root(namespace: str) -> str:
    return f"{ETCD_ROOT}{namespace}"


def instances_prefix(namespace: str, service: str, endpoint: str) -> str:
    """InstanceRecords of one endpoint, one key per instance id."""
    return f"{all_instances_prefix(namespace)}{service}/{endpoint}/"


def instance_key(namespace: str, service: str, endpoint: str, instance_id: str) -> str:
    return instances_prefix(namespace, service, endpoint) + instance_id


def all_instances_prefix(namespace: str) -> str:
    """InstanceRecords of every service and endpoint."""
    return f"{namespace_root(namespace)}/instances/"


def processes_prefix(namespace: str) -> str:
    """ProcessRecords, one key per service process (its instance id)."""
    return f"{namespace_root(namespace)}/processes/"


def process_key(namespace: str, instance_id: str) -> str:
    return processes_prefix(namespace) + instance_id


def models_prefix(namespace: str) -> str:
    """ModelRecords, one key per model and instance."""
    return f"{namespace_root(namespace)}/models/"


def model_key(namespace: str, model: str, instance_id: str) -> str:
    return f"{models_prefix(namespace)}{model}/{instance_id}"


def tunables_prefix(namespace: str) -> str:
    """Live tunables, keyed by their declarations' keys (app/tunables.py); no lease."""
    return f"{namespace_root(namespace)}/tunables/"


def tunable_key(namespace: str, key: str) -> str:
    return tunables_prefix(namespace) + key
