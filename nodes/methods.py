"""One node per distillation method, made from the method registry: its widgets are exactly that method's
options (help as tooltip, range and default from trainers/registry.py), and it outputs a DISTILL_METHOD
for Start Distillation, the way SamplerTCD outputs a SAMPLER for SamplerCustomAdvanced.

Widget order is the declaration order of the options dataclass, which is the saved-workflow format
(widgets_values are positional): a new option is appended at the end of its dataclass.
"""

from __future__ import annotations

import inspect
import math

from ..trainers import registry
from ._api import io, ui
from .run_inputs import validation

CATEGORY = "Distillery/training"
MethodSocket = io.Custom("DISTILL_METHOD")
TEXT_KINDS = ("timesteps", "int_list", "float_pair")  # typed as text, checked by validate_inputs


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _float_step(default: float) -> float:
    return 0.001 if not default else 10.0 ** (math.floor(math.log10(abs(default))) - 1)


def widget(info: registry.OptionInfo):
    """The ComfyUI input for one registered option."""
    tip = info.help + (f" ({info.describe_range()})" if info.describe_range() and not info.choices else "")
    if info.choices:
        return io.Combo.Input(info.name, options=list(info.choices), default=info.default, tooltip=tip)
    if info.kind == "bool":
        return io.Boolean.Input(info.name, default=info.default, tooltip=tip)
    if info.kind == "int":
        return io.Int.Input(info.name, default=info.default, min=int(info.min if info.min is not None else -2**31),
                            max=int(info.max if info.max is not None else 2**31 - 1), tooltip=tip,
                            control_after_generate=False)  # a seed that changes by itself would start new jobs
    if info.kind == "float":
        return io.Float.Input(info.name, default=info.default, min=info.min if info.min is not None else -1e9,
                              max=info.max if info.max is not None else 1e9, step=_float_step(info.default),
                              round=False, tooltip=tip)
    return io.String.Input(info.name, default=_text(info.default), tooltip=tip)


def validate_text_options(infos: list[registry.OptionInfo], **values) -> bool | str:
    """True, or the first error among the given option values (None: fed by a link, checked when the node
    runs)."""
    by_name = {i.name: i for i in infos}
    for name, value in values.items():
        if name in by_name:
            answer = validation(lambda v: registry.coerce(by_name[name], v), value)
            if answer is not True:
                return answer
    return True


def text_validator(infos: list[registry.OptionInfo]):
    """validate_inputs naming only the text-typed options: ComfyUI attaches a failure to every argument the
    function takes, so each argument more puts the same error on one more input. Numbers' ranges ComfyUI
    checks itself; a choice outside its options (only an API prompt or an edited file can hold one: ComfyUI
    0.3.64 does not check a V3 combo's value) is refused when the node runs, before any job exists."""
    names = [i.name for i in infos if i.kind in TEXT_KINDS]

    def validate_inputs(cls, **values):
        return validate_text_options(infos, **values)

    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + \
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names]
    validate_inputs.__signature__ = inspect.Signature(params)
    return classmethod(validate_inputs) if names else None


def method_node(info: registry.MethodInfo) -> type:
    node_id = f"Distillery{info.display_name.replace(' ', '')}"
    infos = info.option_infos()

    def define_schema(cls):
        title = f"Distillery {info.display_name}" + (f" ({info.search_words})" if info.search_words else "")
        return io.Schema(
            node_id=node_id, display_name=title, category=CATEGORY,
            description=f"{info.description} Connect its output to Distillery Start Distillation.",
            inputs=[widget(i) for i in infos],
            outputs=[MethodSocket.Output(display_name="method")])

    def execute(cls, **values):
        options = registry.build(info.options, values, owner=f"method {info.name}")  # one more check, typed
        info.make(options)  # checks across options, which validate_inputs cannot attach to one input
        summary = ", ".join(f"{i.name}={_text(getattr(options, i.name))}" for i in infos
                            if getattr(options, i.name) != i.default)
        return io.NodeOutput({"method": info.name, "options": registry.to_json(options)},
                             ui=ui.PreviewText(f"{info.display_name}: {summary or 'defaults'}"))

    body = {"define_schema": classmethod(define_schema), "execute": classmethod(execute)}
    validator = text_validator(infos)
    if validator is not None:
        body["validate_inputs"] = validator
    return type(node_id, (io.ComfyNode,), body)


NODES = [method_node(info) for info in registry.methods().values()]
