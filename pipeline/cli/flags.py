"""Command-line flags generated from ``SegmentOptions``: one flag per field, named as the field, with the
field's help, default and bounds."""

from __future__ import annotations

import argparse
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.engine.options import SegmentOptions


def flag_of(name: str) -> str:
    """The flag of the field ``name``: ``keep_warm_s`` -> ``--keep-warm-s``."""
    return "--" + name.replace("_", "-")


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        kept = [arg for arg in get_args(annotation) if arg is not type(None)]
        return kept[0] if len(kept) == 1 else annotation
    return annotation


def _json_of(model: type[BaseModel]) -> Any:
    def parse(text: str) -> BaseModel:
        return model.model_validate_json(text)

    parse.__name__ = f"{model.__name__} JSON"  # argparse names the type in its error message
    return parse


def _default_text(field: FieldInfo) -> str:
    default = field.default
    if default is None or isinstance(default, bool) or "(default" in (field.description or ""):
        return ""
    return f" (default: {default})"


def _arguments(name: str, field: FieldInfo) -> dict[str, Any]:
    """argparse's keywords for one field; every default is SUPPRESS: the model alone holds defaults."""
    kind = _without_none(field.annotation)
    keywords: dict[str, Any] = {
        "dest": name,
        "default": argparse.SUPPRESS,
        "help": (field.description or "") + _default_text(field),
    }
    if kind is bool:
        # a flag that is on by default, or decided later when unset, takes --NAME and --no-NAME (--no-crf);
        # one that is off by default is turned on
        keywords["action"] = argparse.BooleanOptionalAction if field.default is not False else "store_true"
    elif get_origin(kind) is Literal:
        keywords["choices"] = list(get_args(kind))
    elif get_origin(kind) is tuple:
        keywords |= {"type": get_args(kind)[0], "nargs": "+"}
    elif isinstance(kind, type) and issubclass(kind, BaseModel):
        keywords |= {"type": _json_of(kind), "metavar": "JSON"}
    elif kind in (int, float, str):
        keywords["type"] = kind
    else:
        raise TypeError(f"SegmentOptions.{name}: no flag for a field of type {field.annotation}")
    return keywords


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """Every ``SegmentOptions`` field as a flag of ``parser``, in the model's order."""
    group = parser.add_argument_group("engine options (SegmentOptions)")
    for name, field in SegmentOptions.model_fields.items():
        group.add_argument(flag_of(name), **_arguments(name, field))


def options_from_args(args: argparse.Namespace) -> SegmentOptions:
    """``SegmentOptions`` from the flags given (the others keep the model's defaults)."""
    given = {name: getattr(args, name) for name in SegmentOptions.model_fields if hasattr(args, name)}
    return SegmentOptions(**given)
