"""The one place a distillation method and its options are declared.

A method module defines its options as a dataclass whose fields are made with `option(...)` (default,
help, range or choices, once) and registers its class with `@register(...)`. Everything else is derived:
the CLI's flags and help (cli_train.py), the ComfyUI method nodes and their widgets (nodes/methods.py),
the validation of values from JSON, HTTP or the command line (`build_options`), the run spec's method
part and its resume check (trainers/spec.py), and the student card (trainers/card.py). No other list of
method names or option table exists; adding a method is one module in trainers/methods/ plus its
`@register`.

The same `option(...)` fields describe the training settings (engine.TrainConfig), so the engine's
settings are checked and shown the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable

# kinds a value can take; `timesteps` is a list of student timesteps written "999,749,499,249"
KINDS = ("int", "float", "str", "bool", "timesteps", "int_list", "float_pair")


def option(default=dataclasses.MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
           choices: tuple | None = None, kind: str | None = None, aliases: tuple = (), default_factory=None,
           advanced: bool = False, node: bool = True):
    """A dataclass field that carries its own help, range and CLI aliases.

    kind: inferred from the default when not given. aliases: other CLI flag names (e.g. `lr` for
    `student_lr`). advanced: shown under ComfyUI's advanced inputs. node: shown in ComfyUI at all (False for
    settings the server owns, e.g. the run folder).
    """
    sample = default_factory() if default_factory is not None else default
    if kind is None:
        kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(sample))
        if kind is None:
            raise TypeError(f"option(default={sample!r}): give kind= for this default")
    if kind not in KINDS:
        raise ValueError(f"option kind {kind!r}: one of {KINDS}")
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices else None, "kind": kind,
            "aliases": tuple(aliases), "advanced": advanced, "node": node}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"distillery": meta})
    return dataclasses.field(default=default, metadata={"distillery": meta})


@dataclass(frozen=True)
class OptionInfo:
    name: str
    kind: str
    default: Any
    help: str
    min: float | None
    max: float | None
    choices: tuple | None
    aliases: tuple
    advanced: bool
    node: bool

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.min is not None and self.max is not None:
            return f"in [{self.min:g}, {self.max:g}]"
        if self.min is not None:
            return f">= {self.min:g}"
        if self.max is not None:
            return f"<= {self.max:g}"
        return ""


def option_infos(options_cls) -> list[OptionInfo]:
    """The declared options of a dataclass made with `option(...)`, in declaration order."""
    infos = []
    for f in dataclasses.fields(options_cls):
        meta = f.metadata.get("distillery")
        if meta is None:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        infos.append(OptionInfo(f.name, meta["kind"], default, meta["help"], meta["min"], meta["max"],
                                meta["choices"], meta["aliases"], meta["advanced"], meta["node"]))
    return infos


def option_info(options_cls, name: str) -> OptionInfo:
    """The declaration of one option (KeyError if `options_cls` declares no such option)."""
    for info in option_infos(options_cls):
        if info.name == name:
            return info
    raise KeyError(f"{options_cls.__name__} declares no option {name!r}")


def _fail(field: str, value, fix: str):
    raise ValueError(f"{field}={value!r}: {fix}")


def coerce(info: OptionInfo, value, field: str | None = None):
    """`value` (from JSON, a widget or the command line) as the option's type, checked against its range.
    Raises ValueError naming the field and the fix."""
    field = field or info.name
    kind = info.kind
    if kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            _fail(field, value, "use true or false")
    elif kind in ("int", "float"):
        if isinstance(value, bool):
            _fail(field, value, f"use a number {info.describe_range()}".rstrip())
        try:
            number = float(value) if kind == "float" else _as_int(value)
        except (TypeError, ValueError):
            _fail(field, value, f"use {'an integer' if kind == 'int' else 'a number'} {info.describe_range()}"
                  .rstrip())
        if kind == "float" and not math.isfinite(number):
            _fail(field, value, f"use a finite number {info.describe_range()}".rstrip())
        if (info.min is not None and number < info.min) or (info.max is not None and number > info.max):
            _fail(field, number, f"use a value {info.describe_range()}")
        value = number
    elif kind == "str":
        if info.choices and "on" in info.choices and "off" in info.choices:  # a switch with more states
            if isinstance(value, bool):
                value = "on" if value else "off"
            elif isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
                value = "on" if value.strip().lower() in ("true", "yes", "1") else "off"
        if not isinstance(value, str):
            _fail(field, value, f"use text {info.describe_range()}".rstrip())
        value = value.strip()
    elif kind == "timesteps":
        from ..sampling.timesteps import parse_timesteps  # format only; the range follows the model

        value = [int(t) if float(t).is_integer() else t for t in parse_timesteps(value, discrete=False, field=field)]
    elif kind == "int_list":
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        try:
            value = [_as_int(v) for v in value]
        except (TypeError, ValueError):
            _fail(field, value, "use whole numbers separated by commas, e.g. 8,4,2,1")
        if not value or (info.min is not None and min(value) < info.min):
            _fail(field, value, f"use whole numbers {info.describe_range()} separated by commas")
    elif kind == "float_pair":
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        try:
            value = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            _fail(field, value, "use two numbers separated by a comma, e.g. 0.9,0.999")
        if len(value) != 2 or any(not math.isfinite(v) for v in value) or \
                (info.min is not None and min(value) < info.min) or (info.max is not None and max(value) > info.max):
            _fail(field, value, f"use two numbers {info.describe_range()} separated by a comma")
    if info.choices and value not in info.choices:
        _fail(field, value, "choose " + info.describe_range())
    return value


def _as_int(value) -> int:
    if isinstance(value, str):
        value = float(value) if any(c in value for c in ".eE") else int(value.strip())
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(value)


def build(options_cls, values: dict | None = None, *, owner: str = "", partial: bool = False):
    """An instance of `options_cls` from user values: unknown keys refused, every value typed and checked.
    Missing keys take their defaults (partial=True returns just the checked dict of what was given)."""
    values = dict(values or {})
    infos = {i.name: i for i in option_infos(options_cls)}
    unknown = sorted(set(values) - set(infos))
    if unknown:
        where = f" of {owner}" if owner else ""
        raise ValueError(f"{unknown[0]}: not an option{where}; its options are {', '.join(infos)}")
    checked = {name: coerce(infos[name], value) for name, value in values.items()}
    return checked if partial else options_cls(**checked)


def check(options):
    """The same options instance type, every field checked as if it came from a user (direct construction
    in Python goes through the same rules as JSON and widgets)."""
    return build(type(options), to_json(options), owner=type(options).__name__)


def to_json(options) -> dict:
    """The options as JSON-ready values (tuples as lists), every field present."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


# --- the methods ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type
    options: type
    display_name: str
    description: str
    sampler: str  # the sampler its students use: x0_renoise | tcd
    needs_critic: bool
    real_images: str  # what real images do for it: "gan" (with a GAN weight) | "data" (its training data)
    search_words: str = ""  # other names users search for (shown in its node's title)

    def make(self, options: dict | Any = None):
        """The method object, its options checked (a dict from JSON, or an options instance)."""
        if options is None or isinstance(options, dict):
            options = build(self.options, options, owner=f"method {self.name}")
        return self.cls(options)

    def option_infos(self) -> list[OptionInfo]:
        return option_infos(self.options)


_METHODS: dict[str, MethodInfo] = {}
_DEFAULT: list[str] = []  # the method a run takes when none is named
METHOD_PACKAGE = __name__.rsplit(".", 1)[0] + ".methods"  # importing it registers every method


def register(name: str, *, options: type, display_name: str, description: str, sampler: str,
             real_images: str = "gan", default: bool = False, search_words: str = "") -> Callable[[type], type]:
    def decorate(cls):
        if name in _METHODS and _METHODS[name].cls is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        if default:
            _DEFAULT[:] = [name]
        cls.name = name
        _METHODS[name] = MethodInfo(name, cls, options, display_name, description, sampler,
                                    bool(getattr(cls, "needs_critic", True)), real_images, search_words)
        return cls

    return decorate


def methods() -> dict[str, MethodInfo]:
    importlib.import_module(METHOD_PACKAGE)
    return dict(_METHODS)


def method_names() -> list[str]:
    return list(methods())


def default_method() -> str:
    methods()
    return _DEFAULT[0] if _DEFAULT else next(iter(_METHODS))


def get(name: str) -> MethodInfo:
    found = methods()
    key = str(name or "").strip().lower()
    if key not in found:
        raise ValueError(f"method={name!r}: choose one of {', '.join(found)}")
    return found[key]


def make_method(name: str, options: dict | Any = None, **kwargs):
    """The method `name` with its options checked: make_method("dmd2", student_timesteps="399")."""
    if options is not None and kwargs:
        raise TypeError("give the options as one dict or as keywords, not both")
    return get(name).make(options if options is not None else kwargs)
