"""HTTP routes under /distillery/ (filled in by the training-jobs work)."""
