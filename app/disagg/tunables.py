"""The decode workers' live disaggregation thresholds (`tandem disagg set|show|reset`),
declared here because app/disagg/policy.py reads them: a change applies to the next request."""

from __future__ import annotations

from typing import Annotated

import msgspec

from app.tunables import Tunable, TunableGroup

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]

MAX_LOCAL_PREFILL_LENGTH: Tunable[int] = Tunable(
    key="disagg/max_local_prefill_length",
    type=NonNegativeInt,
    default=1000,
    doc="uncached prompt tokens prefilled locally",
)
MAX_PREFILL_QUEUE_SIZE: Tunable[int] = Tunable(
    key="disagg/max_prefill_queue_size",
    type=NonNegativeInt,
    default=2,
    doc="queue depth beyond which prefill stays local",
)
DISAGG_TUNABLES = TunableGroup(
    command="disagg",
    help="the decode workers' live disaggregation thresholds",
    tunables=(MAX_LOCAL_PREFILL_LENGTH, MAX_PREFILL_QUEUE_SIZE),
    configured="each VllmWorker's configured thresholds",
)
