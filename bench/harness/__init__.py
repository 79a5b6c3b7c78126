"""What every benchmark runs on, and the end-to-end tests too (docs/benchmarks.md says what each holds)."""
