"""Eval stage: perplexity before/after on held-out legal and general text (see stage.py)."""
