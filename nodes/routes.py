"""HTTP routes under /distillery/ (the training-jobs work fills these in)."""


def register() -> None:
    """Attach our routes to the running PromptServer; a no-op outside a server."""
