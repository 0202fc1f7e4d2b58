"""How an option is declared, checked and read: once, as a typed field of a config dataclass.

An option is a dataclass field made by an ``Opt`` (its default, help, choices and old spellings). From those
fields alone come the command-line flags (``air_ray.cli``), the YAML loader (``Options.load``) and the Python
API (the dataclass itself); all three check values the same way (``Options.validate``): the field's type, its
choices, then the command's own cross-field ``check``. A bad value is an ``AirRayError`` (one line, exit 2 on
the command line) before any model loads or Ray starts.

    FORMAT = Opt("chat", choices=FORMATS, help="...")      # declared once ...
    class ScoreConfig(Options):
        format: str = FORMAT()                             # ... used by every command that has it
    class HeadsConfig(Options):
        dtype: str = DTYPE(default="float32")              # a command may change the default, nothing else

Types: ``str``, ``int``, ``float``, ``bool``, ``X | None``, ``list[str]`` and ``dict`` (a nested mapping, given
on the command line as ``KEY=VALUE`` pairs). YAML keys are the long option names, with ``-`` or ``_``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any

from air_ray.errors import AirRayError


@dataclass(frozen=True)
class Opt:
    """The declaration of one option. Calling it gives the dataclass field; keyword arguments change the
    declaration for one command (``DTYPE(default="float32")``)."""

    default: Any = None
    help: str = ""
    choices: tuple | None = None
    factory: Any = None  # default_factory (lists, dicts)
    aliases: tuple[str, ...] = ()  # old spellings, still accepted and deprecated (a warning names the new one)
    required: bool = False  # must be given (on the command line, in YAML or in Python)
    positional: bool = False  # a positional argument on the command line
    cli: bool = True  # False: Python API and YAML only
    metavar: str | None = None
    group: str = ""  # its section of --help (GROUPS); default: the group of the class that declares the field

    def __call__(self, **changes) -> Any:
        opt = dataclasses.replace(self, **changes)
        if opt.factory is not None:
            return dataclasses.field(default_factory=opt.factory, metadata={"opt": opt})
        return dataclasses.field(default=opt.default, metadata={"opt": opt})


def opt_of(f: dataclasses.Field) -> Opt:
    return f.metadata.get("opt") or Opt(default=None if f.default is MISSING else f.default)


# the sections of `air-ray COMMAND --help`, in this order
GROUPS = ("input", "model", "scoring", "detection", "selection", "training", "evaluation", "placement", "output")


def group_of(cls: type, f: dataclasses.Field) -> str:
    """The --help section of option ``f`` of ``cls``: its declaration's ``group``, else the ``option_group`` of the
    class that first declares the field (a mixin such as ``ModelOptions``, or the command itself)."""
    if opt_of(f).group:
        return opt_of(f).group
    for k in reversed(cls.__mro__):
        if f.name in vars(k).get("__annotations__", {}):
            return getattr(k, "option_group", "")
    return ""


def warn(msg: str) -> None:
    print(f"air-ray: warning: {msg}", file=sys.stderr, flush=True)


def flag(name: str) -> str:
    """``--name-with-dashes``; a field named after a Python keyword ends in ``_`` (``from_``), its flag does not."""
    return "--" + name.rstrip("_").replace("_", "-")


# ----------------------------------------------------------------------------------------------
# types


def _unwrap(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def kind_of(tp) -> str:
    """'str' | 'int' | 'float' | 'bool' | 'list' | 'dict' for a supported annotation."""
    base, _ = _unwrap(tp)
    origin = typing.get_origin(base) or base
    for name, t in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", list), ("dict", dict)):
        if origin is t:
            return name
    raise TypeError(f"unsupported option type {tp!r}")


def optional(tp) -> bool:
    return _unwrap(tp)[1]


_WANT = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
         "list": "a string or a list of strings", "dict": "a mapping of key: value"}


def coerce(value, tp, where: str):
    """``value`` (from YAML, Python or a flag) as the option's type, or AirRayError naming ``where``."""
    if value is None:
        if optional(tp):
            return None
        raise AirRayError(f"{where}: a value is required")
    kind = kind_of(tp)
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
    elif kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "list":
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                    for v in value):
            return [str(v) for v in value]
    elif kind == "dict":
        if isinstance(value, dict):
            return {str(k).replace("-", "_"): v for k, v in value.items()}
    raise AirRayError(f"{where}: expected {_WANT[kind]}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# config objects


class Options:
    """Base of every config dataclass: validation and loading. Subclasses are dataclasses whose fields are
    made by ``Opt``; ``check()`` holds their cross-field rules."""

    command = ""  # the air-ray subcommand, for messages
    option_group = ""  # the --help section of the options this class declares (GROUPS), unless an Opt says

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(fields(cls))  # type: ignore[arg-type]

    @classmethod
    def types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Every accepted key (option names and old spellings, with ``_``) -> the field name."""
        out = {}
        for f in cls.option_fields():
            out[f.name] = out[f.name.rstrip("_")] = f.name
            for a in opt_of(f).aliases:
                out[a.replace("-", "_")] = f.name
        return out

    @property
    def label(self) -> str:
        return self.command or type(self).__name__

    def validate(self):
        """Type and choice checks of every field, then ``check()``. Returns self, values normalised (a single
        input string becomes a list, a YAML ``1e-5`` a float, ...)."""
        hints = self.types()
        for f in self.option_fields():
            o = opt_of(f)
            value = getattr(self, f.name)
            where = f"{self.label} {flag(f.name)}"
            if value is None and o.required:
                raise AirRayError(f"{self.label} needs {flag(f.name)}")
            value = coerce(value, hints[f.name], where)
            if o.choices is not None and value is not None:
                bad = [v for v in (value if isinstance(value, list) else [value]) if v not in o.choices]
                if bad:
                    raise AirRayError(f"{where} {bad[0]!r}: expected one of {', '.join(map(str, o.choices))}")
            object.__setattr__(self, f.name, value)
        self.check()
        return self

    def check(self) -> None:
        """Cross-field rules of the command (ranges, combinations); raise AirRayError."""

    def replace(self, **changes):
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes).validate()

    def to_yaml(self) -> str:
        """The options as a YAML document that ``--config`` reads back to the same config (``--print-config``)."""
        import yaml

        doc = {f.name.rstrip("_"): getattr(self, f.name) for f in self.option_fields()}  # from_: from
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)

    @classmethod
    def normalise(cls, doc, source: str) -> dict:
        """A YAML-style mapping -> {field name: value}: ``-`` or ``_`` in keys, old spellings (with a
        warning); an unknown key is an error."""
        if not isinstance(doc, dict):
            raise AirRayError(f"{source}: expected a mapping of option: value")
        keys = cls.keys()
        out = {}
        for k, v in doc.items():
            key = str(k).replace("-", "_")
            if key not in keys:
                raise AirRayError(f"{source}: unknown option {k!r}")
            if key not in (keys[key], keys[key].rstrip("_")):
                warn(f"{source}: {k!r} is deprecated; use {keys[key].rstrip('_')!r}")
            out[keys[key]] = v
        return out

    @classmethod
    def build(cls, values: dict, source: str = ""):
        """A validated config from {field name: value}; a name that is not a field is an error."""
        names = {f.name for f in cls.option_fields()}
        unknown = sorted(set(values) - names)
        if unknown:
            raise AirRayError(f"{source or cls.command or cls.__name__}: unknown option {unknown[0]!r}")
        return cls(**values).validate()

    @classmethod
    def load(cls, config: str | None = None, **given):
        """Defaults < the YAML file ``config`` < ``given`` (field values, e.g. the flags on a command line)."""
        values = cls.normalise(read_yaml(config), f"config {config}") if config else {}
        values.update(given)
        return cls.build(values, f"config {config}" if config else "")


def read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise AirRayError(f"config {path}: {str(e).splitlines()[0]}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise AirRayError(f"config {path}: expected a mapping of option: value")
    return doc
