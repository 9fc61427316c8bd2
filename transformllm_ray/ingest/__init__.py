"""Ingest stage: raw shards -> cleaned, de-duplicated, token-bounded chunks (see stage.py)."""
