"""The distillation methods: one module each, registered with trainers.registry.register.

Importing this package imports every module in it, so a new method is one file here with its `@register`.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
