"""ComfyUI-Distillery: the ComfyUI entry point (placeholder until the nodes land)."""
