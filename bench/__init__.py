"""Benchmarks for Tandem: load generation and scenarios (not tests)."""
