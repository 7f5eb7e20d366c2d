"""Pydantic's validation errors as the config's own messages: one per problem, each starting with the
field path the user wrote (`study.paths[2]`, `sinks.parquet.rows_per_file`), saying what was expected and
what came."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Dict, Iterable, List, Sequence, Tuple, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .messages import kind_of, short


def describe_errors(error: ValidationError, root_type: Any, study_kinds: Sequence[str]) -> List[str]:
    """One message per problem of `error`, each starting with the field path the user wrote.

    `root_type` is the model that was validated (the sweep's config), walked to name the keys a section
    knows; `study_kinds` are named where the study's `kind` is missing or unknown.
    """
    kinds = ", ".join(study_kinds)
    messages: List[Any] = []  # a str, or (where, errors) for a value no member of a union took
    alternatives: Dict[str, List[Dict[str, Any]]] = {}
    for err in error.errors():
        # in_union: the value itself fit no member of a union
        path, tp_parent, in_union = _walk(err["loc"], root_type)
        kind = err["type"]
        got = f" (got {short(err.get('input'))})"
        if kind == "sweep_at":
            where = _join_path(tuple(path) + tuple(err["ctx"]["at"])) or "top level"
            messages.append(f"{where}: {err['ctx']['reason']}")
            continue
        if kind == "invalid_key" or (path and path[-1] == "[key]"):
            # ('model', 'kwargs', 1, '[key]'): the key 1 of model.kwargs; (1,): the top-level key 1
            where = _join_path(path[:-2] if path and path[-1] == "[key]" else path[:-1]) or "top level"
            key = err.get("input")
            messages.append(f"{where}: the key {short(key)} is {kind_of(key)}; keys should be strings")
            continue
        where = _join_path(path) or "top level"
        if in_union:  # e.g. workers.count: neither 'auto' nor an integer
            if where not in alternatives:
                alternatives[where] = []
                messages.append((where, alternatives[where]))
            alternatives[where].append(err)
            continue
        if kind == "extra_forbidden":
            known = _fields_of(tp_parent)
            hint = difflib.get_close_matches(str(path[-1]), known, n=1) if path else []
            text = f"{where}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            if known:
                text += f"; known keys: {', '.join(known)}"
        elif kind == "missing":
            text = f"{where}: required field is missing"
        elif kind in ("union_tag_invalid", "union_tag_not_found") and not isinstance(err.get("input"), dict):
            text = f"{where}: should be a mapping of settings, got {kind_of(err.get('input'))}{got}"
        elif kind == "union_tag_invalid":
            tag = err["input"].get("kind")
            text = f"{where}.kind: unknown study kind {short(tag)}; known kinds: {kinds}"
        elif kind == "union_tag_not_found":
            text = f"{where}.kind: required field is missing; known kinds: {kinds}"
        elif kind in ("too_short", "too_long") and isinstance(err.get("input"), str):
            bound = err.get("ctx", {}).get("min_length" if kind == "too_short" else "max_length")
            text = f"{where}: should have {'at least' if kind == 'too_short' else 'at most'} {bound} characters{got}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            text = f"{where}: should be a mapping of settings, got {kind_of(err.get('input'))}{got}"
        else:
            text = f"{where}: {_message(err)}{got}"
        messages.append(text)
    # A value no member of a union took: one message saying what each member wanted.
    for i, item in enumerate(messages):
        if isinstance(item, tuple):
            where, errs = item
            wanted = " or ".join(dict.fromkeys(_message(e).removeprefix("Input should be ").removeprefix("should be ")
                                               for e in errs))
            messages[i] = f"{where}: should be {wanted} (got {short(errs[0].get('input'))})"
    return messages


def _message(err: Dict[str, Any]) -> str:
    return err["msg"].removeprefix("Value error, ")


def _walk(loc: Sequence[Any], root_type: Any) -> Tuple[List[Any], Any, bool]:
    """The user's field path for a pydantic error location (union member tags dropped), the type
    holding the last part, and whether a union member tag was dropped."""
    path: List[Any] = []
    tp: Any = root_type
    parent: Any = None
    in_union = False
    for part in loc:
        tp = _unwrap(tp)
        if _is_union(tp):
            tp = _union_member(tp, part)
            in_union = True
            continue
        in_union = False
        parent = tp
        path.append(part if not (isinstance(part, int) and not isinstance(part, bool)) else [part])
        tp = _child(tp, part)
    return path, _unwrap(parent), in_union


def _unwrap(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) is Union:
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) is Union


def _union_member(tp: Any, tag: Any) -> Any:
    """The member of a union that pydantic's location part `tag` names (a study kind, a class, a tag)."""
    for member in get_args(tp):
        inner = member
        tags = []
        while get_origin(inner) is Annotated:
            tags += [getattr(m, "tag", None) for m in get_args(inner)[1:]]
            inner = get_args(inner)[0]
        if tag is not None and tag in tags:
            return inner
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            kind = inner.model_fields.get("kind")
            if inner.__name__ == tag or (kind is not None and tag in get_args(kind.annotation)):
                return inner
        if isinstance(tag, str) and get_origin(inner) is list and tag.startswith("list["):
            return inner
    return None


def _child(tp: Any, part: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field is not None else None
    origin = get_origin(tp)
    if origin is list:
        return get_args(tp)[0]
    if origin is dict:
        return get_args(tp)[1]
    return None


def _fields_of(tp: Any) -> List[str]:
    """Field names of a config section, for 'did you mean' hints."""
    return list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _join_path(parts: Iterable[Any]) -> str:
    """('study', 'paths', [2]) -> 'study.paths[2]'; ints from a location are list indexes."""
    text = ""
    for part in parts:
        if isinstance(part, list):
            text += f"[{part[0]}]"
        elif isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text
