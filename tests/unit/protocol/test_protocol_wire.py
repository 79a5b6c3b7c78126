"""The wire format of every protocol type, pinned: a peer built from an older tree still talks.

The bytes were produced by the definitions before the protocol package existed (commit
cf02ed7: app/protocol.py, app/preprocess/items.py, app/router/load.py,
app/components/disagg.py, app/runtime/discovery.py). A change that fails here changes
the wire; add a field with a default instead.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from app import protocol

REQUEST = protocol.PreprocessedRequest(
    request_id="r1",
    model="m",
    token_ids=[1, 2, 3],
    sampling=protocol.SamplingOptions(temperature=0.5, seed=7, logprobs=2),
    stop=protocol.StopConditions(max_tokens=8, stop_token_ids=[2]),
    kv_transfer_params={"a": 1},
)

# A sample of each wire type, by the name of its type in app.protocol; the wire type of
# a placement event is the message that carries a list of them.
SAMPLES: dict[str, Any] = {
    "PreprocessedRequest": REQUEST,
    "EngineOutput": protocol.EngineOutput(
        token_ids=[5],
        logprobs=[-0.5],
        top_logprobs=[[protocol.TokenLogprob(5, -0.5)]],
        finish_reason="stop",
        num_prompt_tokens=3,
        num_cached_tokens=0,
        worker_id="w",
        prefill_worker_id="pw",
    ),
    "RouteRequest": protocol.RouteRequest(request_id="r1", token_ids=[1, 2]),
    "RouteDecision": protocol.RouteDecision(worker_id="w", overlap_blocks=2, prompt_blocks=3),
    "ModelInfo": protocol.ModelInfo(name="m", max_model_len=128, block_size=16, model_path="/x"),
    "LoadReport": protocol.LoadReport(
        worker_id="w", running=1, waiting=2, kv_used_blocks=3, kv_total_blocks=4, timestamp=1.5
    ),
    "KvEventBatch": protocol.KvEventBatch(
        worker_id="w",
        seq=3,
        block_size=4,
        timestamp=2.0,
        events=[
            protocol.BlockStored(token_ids=[1, 2, 3, 4], block_hashes=[11, b"h"], parent_block_hash=9),
            protocol.BlockRemoved(block_hashes=[11]),
            protocol.AllBlocksCleared(),
        ],
    ),
    "StreamItem": protocol.StreamItem(
        text="hi",
        completion_tokens=1,
        finish_reason="length",
        prompt_tokens=3,
        cached_tokens=0,
        worker_id="w",
        prefill_worker_id="pw",
        logprobs=[protocol.TokenLogprobs("hi", [104, 105], -0.1, [protocol.TopLogprob("ho", [104], -2.0)])],
    ),
    "PlacementEvent": [
        protocol.PlacementEvent(
            router_id="r", request_id="q", worker_id="w", kind="routed", prompt_blocks=3, overlap_blocks=1
        ),
        protocol.PlacementEvent(router_id="r", request_id="q", worker_id="w", kind="finished"),
    ],
    "PrefillJob": protocol.PrefillJob(job_id="j", request=REQUEST, decode_worker_id="d", deadline=1.25),
    "PrefillAnswer": protocol.PrefillAnswer(job_id="j", prefill_worker_id="p", kv_transfer_params={"x": [1]}),
    "PrefillWanted": protocol.PrefillWanted(job_id="j"),
    "InstanceRecord": protocol.InstanceRecord(
        namespace="ns",
        service="S",
        endpoint="e",
        instance_id="1",
        subject="tandem.ns.S.e.1",
        host="h",
        pid=9,
        metadata={"k": 1},
    ),
    "ModelRecord": protocol.ModelRecord(
        name="m",
        instance_id="1",
        service="S",
        endpoint="e",
        metadata={"block_size": 16},
    ),
}

GOLDEN = {
    "PreprocessedRequest": (
        "86aa726571756573745f6964a27231a56d6f64656ca16da9746f6b656e5f69647393010203a873616d706c696e6783ab"
        "74656d7065726174757265cb3fe0000000000000a47365656407a86c6f6770726f627302a473746f7082aa6d61785f74"
        "6f6b656e7308ae73746f705f746f6b656e5f6964739102b26b765f7472616e736665725f706172616d7381a16101"
    ),
    "EngineOutput": (
        "88a9746f6b656e5f6964739105a86c6f6770726f627391cbbfe0000000000000ac746f705f6c6f6770726f6273919192"
        "05cbbfe0000000000000ad66696e6973685f726561736f6ea473746f70b16e756d5f70726f6d70745f746f6b656e7303"
        "b16e756d5f6361636865645f746f6b656e7300a9776f726b65725f6964a177b170726566696c6c5f776f726b65725f69"
        "64a27077"
    ),
    "RouteRequest": "82aa726571756573745f6964a27231a9746f6b656e5f696473920102",
    "RouteDecision": "83a9776f726b65725f6964a177ae6f7665726c61705f626c6f636b7302ad70726f6d70745f626c6f636b7303",
    "ModelInfo": (
        "84a46e616d65a16dad6d61785f6d6f64656c5f6c656ecc80aa626c6f636b5f73697a6510aa6d6f64656c5f70617468a22f78"
    ),
    "LoadReport": (
        "86a9776f726b65725f6964a177a772756e6e696e6701a777616974696e6702ae6b765f757365645f626c6f636b7303af"
        "6b765f746f74616c5f626c6f636b7304a974696d657374616d70cb3ff8000000000000"
    ),
    "KvEventBatch": (
        "85a9776f726b65725f6964a177a373657103aa626c6f636b5f73697a6504a66576656e74739384a474797065a673746f"
        "726564a9746f6b656e5f6964739401020304ac626c6f636b5f686173686573920bc40168b1706172656e745f626c6f63"
        "6b5f686173680982a474797065a772656d6f766564ac626c6f636b5f686173686573910b81a474797065a7636c656172"
        "6564a974696d657374616d70cb4000000000000000"
    ),
    "StreamItem": (
        "88a474657874a26869b1636f6d706c6574696f6e5f746f6b656e7301ad66696e6973685f726561736f6ea66c656e6774"
        "68ad70726f6d70745f746f6b656e7303ad6361636865645f746f6b656e7300a86c6f6770726f62739194a26869926869"
        "cbbfb999999999999a9193a2686f9168cbc000000000000000a9776f726b65725f6964a177b170726566696c6c5f776f"
        "726b65725f6964a27077"
    ),
    "PlacementEvent": (
        "9286a9726f757465725f6964a172aa726571756573745f6964a171a9776f726b65725f6964a177a46b696e64a6726f75"
        "746564ad70726f6d70745f626c6f636b7303ae6f7665726c61705f626c6f636b730184a9726f757465725f6964a172aa"
        "726571756573745f6964a171a9776f726b65725f6964a177a46b696e64a866696e6973686564"
    ),
    "PrefillJob": (
        "84a66a6f625f6964a16aa77265717565737486aa726571756573745f6964a27231a56d6f64656ca16da9746f6b656e5f"
        "69647393010203a873616d706c696e6783ab74656d7065726174757265cb3fe0000000000000a47365656407a86c6f67"
        "70726f627302a473746f7082aa6d61785f746f6b656e7308ae73746f705f746f6b656e5f6964739102b26b765f747261"
        "6e736665725f706172616d7381a16101b06465636f64655f776f726b65725f6964a164a8646561646c696e65cb3ff400"
        "0000000000"
    ),
    "PrefillAnswer": (
        "83a66a6f625f6964a16ab170726566696c6c5f776f726b65725f6964a170b26b765f7472616e736665725f706172616d7381a1789101"
    ),
    "PrefillWanted": "81a66a6f625f6964a16a",
    "InstanceRecord": (
        "88a96e616d657370616365a26e73a773657276696365a153a8656e64706f696e74a165ab696e7374616e63655f6964a1"
        "31a77375626a656374af74616e64656d2e6e732e532e652e31a4686f7374a168a370696409a86d6574616461746181a1"
        "6b01"
    ),
    "ModelRecord": (
        "85a46e616d65a16dab696e7374616e63655f6964a131a773657276696365a153a8656e64706f696e74a165a86d657461"
        "6461746181aa626c6f636b5f73697a6510"
    ),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encoding_is_what_it_was_and_decodes_back(name: str) -> None:
    wire_type = protocol.PlacementMessage if name == "PlacementEvent" else getattr(protocol, name)
    value = SAMPLES[name]
    encoded = msgspec.msgpack.encode(value)
    assert encoded.hex() == GOLDEN[name]
    assert msgspec.msgpack.decode(encoded, type=wire_type) == value


def test_a_lone_placement_event_is_still_a_placement_message() -> None:
    event = protocol.PlacementEvent(router_id="r", request_id="q", worker_id="w", kind="prefill_done")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(event), type=protocol.PlacementMessage) == event


def test_the_choice_fields_are_left_off_for_one_choice_and_travel_for_more() -> None:
    """n and index (OpenAI's n > 1): a request of one choice is the bytes it always was."""
    assert "n" not in msgspec.msgpack.decode(msgspec.msgpack.encode(msgspec.structs.replace(REQUEST, n=1)))
    several = msgspec.msgpack.encode(msgspec.structs.replace(REQUEST, n=3))
    assert msgspec.msgpack.decode(several, type=protocol.PreprocessedRequest).n == 3
    wire_types: tuple[type[protocol.EngineOutput] | type[protocol.StreamItem], ...] = (
        protocol.EngineOutput,
        protocol.StreamItem,
    )
    for wire_type in wire_types:
        assert "index" not in msgspec.msgpack.decode(msgspec.msgpack.encode(wire_type()))
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(wire_type(index=2)), type=wire_type).index == 2
