"""The pinned ComfyUI V3 API. v0_0_2 is the versioned alias ComfyUI's maintainers recommend."""

try:
    from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401
except ImportError:  # older servers ship only `latest`
    from comfy_api.latest import ComfyExtension, io, ui  # noqa: F401
