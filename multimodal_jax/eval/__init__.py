"""Evaluation: zero-shot classification, retrieval, linear probes (more per experiment family)."""
