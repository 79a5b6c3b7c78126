"""Tandem's benchmarks: one command each (docs/benchmarks.md), on the harness in bench/harness/."""
