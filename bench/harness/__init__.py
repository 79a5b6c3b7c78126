"""What every benchmark runs on, and the end-to-end tests too: `launch` (NATS, etcd, graphs
under `tandem serve` and other servers, each stopped by its PID), `load` (the one load driver),
`stats` (percentiles, medians), `report` (docs/benchmarks.md's sections) and `cli`."""
