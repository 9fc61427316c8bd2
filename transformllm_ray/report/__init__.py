"""Report stage: report.md and PNG plots of a run (see stage.py)."""
