"""The names in app/protocol/names.py are the ones the services actually serve and use."""

from __future__ import annotations

from app.components.frontend import Frontend
from app.components.kv_router import Router
from app.components.prefill_worker import PrefillWorker
from app.components.processor import Processor
from app.components.worker import VllmWorker
from app.protocol import names
from app.sdk.service import spec_of


def test_service_and_endpoint_names_match_the_services() -> None:
    served = {
        names.FRONTEND: (Frontend, ()),
        names.PROCESSOR: (Processor, (names.CHAT_COMPLETIONS, names.COMPLETIONS, names.TOKENIZE, names.DETOKENIZE)),
        names.ROUTER: (Router, (names.ROUTE,)),
        names.VLLM_WORKER: (VllmWorker, (names.GENERATE, names.PREFILL_DONE, names.PREFILL_WANTED, names.KV_BLOCKS)),
        names.PREFILL_WORKER: (PrefillWorker, (names.PREFILL_STATUS,)),
    }
    for name, (service, endpoints) in served.items():
        spec = spec_of(service)
        assert spec.name == name
        assert sorted(spec.endpoints) == sorted(endpoints), name


def test_subjects_and_keys_keep_their_layout() -> None:
    # Peers of other builds find each other by these: see docs/internals.md §1.
    subject = names.endpoint_subject("ns", "Router", "route", "7f")
    assert subject == "tandem.ns.Router.route.7f"
    assert names.control_subject(subject) == "tandem.ns.Router.route.7f.ctl"
    assert names.event_subject("ns", names.KV_EVENTS_TOPIC) == "tandem.ns.events.kv"
    assert names.queue_subject("ns", names.PREFILL_QUEUE) == "tandem.ns.queue.prefill_queue"
    assert names.inbox_prefix("abc") == "_INBOX.abc."
    assert names.instance_key("ns", "VllmWorker", "generate", "7f") == "/tandem/ns/instances/VllmWorker/generate/7f"
    assert names.model_key("ns", "org/m", "7f") == "/tandem/ns/models/org/m/7f"
    assert names.tunable_key("ns", "router/policy") == "/tandem/ns/tunables/router/policy"
    assert all(key.startswith(names.ETCD_ROOT) for key in (names.models_prefix("ns"), names.tunables_prefix("ns")))
