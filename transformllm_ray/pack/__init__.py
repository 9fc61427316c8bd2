"""Pack stage: tokenise, mix with general text, pack fixed-length sequences (see stage.py)."""
