"""Command-line flags generated from pydantic models (``SegmentOptions``, ``StacSearch``): one flag per field,
named as the field (behind a prefix where one is given), with the field's help, default and bounds."""

from __future__ import annotations

import argparse
import json
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.engine.options import SegmentOptions
from pipeline.io.stac_input import StacSearch

Model = TypeVar("Model", bound=BaseModel)


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
    if (
        field.is_required()
        or default is None
        or isinstance(default, bool)
        or "(default" in (field.description or "")
    ):
        return ""
    return f" (default: {default})"


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


_json_object.__name__ = "JSON object"  # argparse names the type in its error message


def _arguments(name: str, field: FieldInfo, dest: str) -> dict[str, Any]:
    """argparse's keywords for one field; every default is SUPPRESS: the model alone holds defaults."""
    kind = _without_none(field.annotation)
    keywords: dict[str, Any] = {
        "dest": dest,
        "default": argparse.SUPPRESS,
        "help": (field.description or "") + _default_text(field),
    }
    if kind is bool:
        # a flag that is on by default, or decided later when unset, takes --NAME and --no-NAME (--no-crf);
        # one that is off by default is turned on
        keywords["action"] = argparse.BooleanOptionalAction if field.default is not False else "store_true"
    elif get_origin(kind) is Literal:
        keywords["choices"] = list(get_args(kind))
    elif get_origin(kind) in (tuple, list):
        keywords |= {"type": get_args(kind)[0], "nargs": "+"}
    elif get_origin(kind) is dict:
        keywords |= {"type": _json_object, "metavar": "JSON"}
    elif isinstance(kind, type) and issubclass(kind, BaseModel):
        keywords |= {"type": _json_of(kind), "metavar": "JSON"}
    elif kind in (int, float, str):
        keywords["type"] = kind
    else:
        raise TypeError(f"{name}: no flag for a field of type {field.annotation}")
    return keywords


def add_model_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], title: str, prefix: str = ""
) -> None:
    """Every field of ``model`` as a flag of ``parser`` (``--PREFIX-NAME``), in the model's order."""
    group = parser.add_argument_group(title)
    for name, field in model.model_fields.items():
        group.add_argument(flag_of(prefix + name), **_arguments(name, field, prefix + name))


def model_from_args(args: argparse.Namespace, model: type[Model], prefix: str = "") -> Model:
    """``model`` from the flags given (the others keep the model's defaults)."""
    given = {
        name: getattr(args, prefix + name) for name in model.model_fields if hasattr(args, prefix + name)
    }
    return model(**given)


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """Every ``SegmentOptions`` field as a flag of ``parser``."""
    add_model_flags(parser, SegmentOptions, "engine options (SegmentOptions)")


def options_from_args(args: argparse.Namespace) -> SegmentOptions:
    return model_from_args(args, SegmentOptions)


STAC_PREFIX = "stac_"


def add_search_flags(parser: argparse.ArgumentParser) -> None:
    """A STAC API search as the run's input: ``--stac-url`` and the search's fields (``StacSearch``)."""
    add_model_flags(parser, StacSearch, "STAC API search (an input besides the scenes)", STAC_PREFIX)


def search_from_args(args: argparse.Namespace) -> StacSearch | None:
    """The search the flags describe; None without ``--stac-url``."""
    if not hasattr(args, STAC_PREFIX + "url"):
        return None
    return model_from_args(args, StacSearch, STAC_PREFIX)
