"""`tandem doctor`: checks a running fleet for the mistakes that make a multi-node
deployment silently worse, and says what to do (docs/operations.md).

- `check`: `Check` (one result) and `Fleet` (what the checks read)
- `gather`: `gather_fleet`, the `Fleet` read through a `Runtime` from what the fleet publishes
- one module per group of checks, each a function of a `Fleet` (no I/O but `reach`'s):
  `kv_layout` (block size, hash scheme, model), `versions`, `transport` (NATS max_payload,
  the JetStream prefill queue), `kv_feed` (KV events reach the routers), `clocks`, `reach`
  (the PrefillWorkers' NIXL side channels), `static` (`-f CONFIG`)
- `cli`: the command, its text and JSON
"""
