"""Model assets: the built-in demo model (from a PyPI wheel) and tiny test models."""
