"""Tiny models, demo data and fault injection, for the tests and `batchllm demo` (never imported by `run`)."""
