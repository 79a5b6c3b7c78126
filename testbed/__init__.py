"""What the tests and the benchmarks both run: NATS and etcd of their own and graphs under
`tandem serve` (`testbed.graphs`). Not shipped: the package is `app`."""
