"""ComfyUI adapters. Thin: each node translates ComfyUI types to the core and back.

Only imported inside a running ComfyUI (it imports `comfy_api`). Each module in NODE_MODULES exposes
`NODES`, a list of V3 `io.ComfyNode` classes; their node ids all start with "Distillery".
"""

import importlib
import logging

from ._api import ComfyExtension

NODE_MODULES: list[str] = [
    "samplers",
    "hybrid",
    "run_inputs",
    "methods",
    "jobs",
    "plan",
]

log = logging.getLogger("distillery")


def all_nodes() -> list:
    found = []
    for name in NODE_MODULES:
        module = importlib.import_module(f".{name}", __name__)
        found.extend(module.NODES)
    return found


class DistilleryExtension(ComfyExtension):
    async def get_node_list(self):
        # ComfyUI 0.3.64's loader calls only get_node_list (not on_load), once: register routes here.
        from . import routes

        routes.register()
        return all_nodes()
