"""Tandem: multi-node LLM serving (Frontend -> Processor -> Router -> vLLM workers)."""
