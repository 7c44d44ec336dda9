"""Synthetic document corpora: specs, offline renderer, LLM generation, QA pairs, hygiene (see docs/synth.md)."""
