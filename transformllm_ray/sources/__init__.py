"""Input sources: file readers (JSONL, Parquet, text) and built-in corpora from installed packages."""
