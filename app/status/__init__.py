"""`tandem status`: what runs in a namespace, gathered from what the fleet publishes.

- `model`: the `FleetStatus` (the `--json` shape, docs/operations.md) and `assemble`, which
  builds it from records and reports
- `gather`: `FleetObserver` / `fleet_status`, which read them through a `Runtime`
- `render`: text tables and JSON
- `cli`: the command's arguments
"""
