"""ComfyUI-Distillery, the ComfyUI entry point.

ComfyUI imports this folder (custom_nodes/<folder>) as a package and calls `comfy_entrypoint`. We export
no NODE_CLASS_MAPPINGS on purpose: a module that does is registered as a V1 pack and its entrypoint is
never called. Everything inside the pack is imported relatively, because ComfyUI owns the top-level
name `nodes`. Outside ComfyUI the same folder is the installed package `comfyui_distillery`, and this
file does nothing on import.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import DistilleryExtension

    return DistilleryExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
