"""The config's YAML: read with YAML 1.2 scalars, duplicate keys refused, every problem naming its key path;
written so that any YAML reader reads it back the same."""

from __future__ import annotations

import re
from typing import Any, Dict

import yaml

from .errors import ConfigError
from .messages import first_line, one_line, short


class _YamlValueError(yaml.YAMLError):
    """A value YAML parsed but could not construct (a date out of range, a huge integer, a duplicate key)."""

    def __init__(self, at: str, message: str):
        super().__init__(f"{at}: {message}" if at else message)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and naming the key path of a value it cannot read."""

    paths: Dict[int, str] = {}

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, ArithmeticError) as e:  # int('9' * 5000), date(2024, 13, 45), …
            value = node.value if isinstance(node, yaml.ScalarNode) else node.tag
            reason = "too many digits" if "integer string conversion" in str(e) else first_line(e)
            raise _YamlValueError(self._at(node), f"cannot read {short(value)} (line {node.start_mark.line + 1}): "
                                                  f"{reason}") from None

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: PyYAML says so below
                    continue
                if duplicate:
                    at = self._at(node)
                    raise _YamlValueError(f"{at}.{key}" if at else str(key),
                                          f"duplicate key {short(key)} (line {key_node.start_mark.line + 1}); "
                                          f"YAML would keep only the last one")
        return super().construct_mapping(node, deep=deep)

    def _at(self, node: yaml.Node) -> str:
        return self.paths.get(id(node), "")

    def construct_yaml_int(self, node: yaml.Node) -> int:
        """A decimal integer (the only kind YAML_12_SCALARS lets through untagged): '017' is 17, not octal."""
        return int(self.construct_scalar(node), 10)


#: How a plain (unquoted) scalar becomes true/false or a number: YAML 1.2's core schema, with integers in
#: decimal only. YAML 1.1 (PyYAML's default) reads yes/no/on/off as true/false and 0x10, 0o17, 0b101,
#: 1_000 and 1:30 (base 60) as numbers; here those are strings, which a number field refuses, naming itself.
YAML_12_SCALARS = (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^[-+]?[0-9]+$", "-+0123456789"),
    ("tag:yaml.org,2002:float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
)
#: YAML 1.1's implicit types that YAML_12_SCALARS replaces, and its 'value' type (a lone `=`: a string here).
_YAML_11_SCALARS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                    "tag:yaml.org,2002:value")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_11_SCALARS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in YAML_12_SCALARS:
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


class _Dumper(yaml.SafeDumper):
    """Writes a string quoted where YAML 1.1 or 1.2 would read it as something else ('yes', '1e3', '0x10'),
    so config.yaml reads back the same here and in any other YAML reader."""


_Dumper.yaml_implicit_resolvers = {first: list(resolvers)
                                   for first, resolvers in yaml.SafeDumper.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in YAML_12_SCALARS:
    _Dumper.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _node_paths(root: yaml.Node, prefix: str) -> Dict[int, str]:
    """id(node) -> the key path of every node under `root` (keys get their mapping's path)."""
    paths: Dict[int, str] = {}
    stack = [(root, prefix)]
    while stack:
        node, at = stack.pop()
        if id(node) in paths:
            continue
        paths[id(node)] = at
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                stack.append((key_node, at))
                stack.append((value_node, f"{at}.{key}" if at else key))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(node.value))
    return paths


def read_yaml(text: str, *, source: str, at: str = "") -> Any:
    """Parse YAML with the safe loader; every problem is a one-line `ConfigError` starting with `source`."""
    loader = None
    try:
        loader = _Loader(text)  # refuses characters YAML does not allow
        node = loader.get_single_node()
        if node is None:
            return None
        loader.paths = _node_paths(node, at)
        return loader.construct_document(node)
    except _YamlValueError as e:
        raise ConfigError(one_line(f"{source}: {e}")) from None
    except yaml.MarkedYAMLError as e:
        raise ConfigError(one_line(f"{source}: not valid YAML: {_yaml_problem(e)}")) from None
    except RecursionError:
        raise ConfigError(one_line(f"{source}: not valid YAML: nested too deeply")) from None
    except Exception as e:  # the reader's own errors, whatever their type
        raise ConfigError(one_line(f"{source}: not valid YAML: {first_line(e)}")) from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = error.problem or error.context or type(error).__name__
    if error.problem and error.context:
        text += f" ({error.context})"
    return where + text


def dump_yaml(data: Any) -> str:
    """`data` as YAML that reads back the same here and in any other YAML reader (keys in their order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
