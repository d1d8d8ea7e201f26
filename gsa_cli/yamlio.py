"""YAML in and out, bounded and with YAML 1.2 numbers. Nothing here imports torch.

Presets, ``--set`` values and the config saved in a checkpoint are read by :func:`load_yaml_text` (and
files by :func:`read_yaml_file`), a ``yaml.SafeLoader`` with these differences:

- **Bounds.** At most :data:`MAX_BYTES` of text, :data:`MAX_VALUES` values once aliases are expanded
  (a few hundred bytes of nested aliases, "billion laughs", would otherwise expand to billions),
  :data:`MAX_DEPTH` levels of nesting, and no alias inside the value it names.
- **Numbers as YAML 1.2 reads them** (the core schema): ``3e-4``, ``1e3`` and ``0.00005`` are floats,
  ``010`` is decimal 10, ``0o10`` octal 8, ``0x10`` hex 16, ``.inf`` and ``.nan`` floats, and YAML 1.1's
  sexagesimal ``1:30``, binary ``0b11`` and dates are text. ``1_000`` still reads as 1000, and booleans
  keep YAML 1.1's spellings (``yes``/``no``/``on``/``off``), which older presets may use.
- **No key twice** in one mapping: YAML 1.1 keeps the last silently.

Every refusal is a :class:`~gsa_cli.errors.ConfigError` of one line naming the source and, where there
is one, the line. :func:`dump_yaml` writes text that reads back the same under this loader and under
plain ``yaml.safe_load``; :func:`shown` is a value's ``repr`` cut to a length fit for a message.
"""

from __future__ import annotations

import math
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from gsa_cli.errors import ConfigError, GsaError

MAX_BYTES = 1_000_000  # a preset is about 1 kB
MAX_VALUES = 10_000  # scalars, lists and mappings after alias expansion (a preset has about 60)
MAX_DEPTH = 64  # levels of nesting (a preset has 3)
SHOWN_LENGTH = 80  # characters of a value in a message

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_STR_TAG = "tag:yaml.org,2002:str"
# YAML 1.1 resolvers that YAML 1.2's core schema does not have, or reads differently.
_YAML_1_1_ONLY = (_INT_TAG, _FLOAT_TAG, "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")
# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), with 1_000 kept from 1.1.
_INT = re.compile(r"^(?:[-+]?[0-9]+(?:_[0-9]+)*|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _Refusal(yaml.YAMLError):
    """Input the loader will not read: ``message`` for the user, ``mark`` where it is."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


def _shortened(text: str, limit: int = SHOWN_LENGTH) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxstring = _REPR.maxother = SHOWN_LENGTH
_REPR.maxlong = 40


def shown(value: Any, limit: int = SHOWN_LENGTH) -> str:
    """``repr(value)`` in at most ``limit`` characters, computed in bounded time whatever the value."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        text = f"<an integer of {value.bit_length()} bits>"
    return _shortened(text, limit)


# ---------------------------------------------------------------------------------------------------
# The loader.


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` with YAML 1.2 numbers, bounded expansion and depth, and no duplicate keys."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._sizes: dict[int, int] = {}  # id(node) -> how many values it expands to
        self._open_anchors: list[str] = []  # anchors of the nodes being composed, outermost first
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                name = _shortened(str(event.anchor), 40)
                raise _Refusal(
                    f"the alias *{name} is inside the value it names (it refers to itself)", event.start_mark
                )
            node = super().compose_node(parent, index)
            self._count(node, self._sizes.get(id(node), 1), event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refusal(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        self._open_anchors.append(event.anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open_anchors.pop()
            self._depth -= 1
        self._count(node, 1 + sum([self._sizes[id(child)] for child in _children(node)]), event.start_mark)
        return node

    def _count(self, node: yaml.Node | None, size: int, mark: Any) -> None:
        """Record that ``node`` expands to ``size`` values; refuse a document past the bound."""
        if size > MAX_VALUES:
            raise _Refusal(
                f"its aliases expand to more than {MAX_VALUES} values (nested aliases, a 'billion laughs'?)",
                mark,
            )
        self._sizes[id(node)] = size

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *base' merges; a key given here overrides the merged one, as in YAML 1.1
            key = self.construct_object(key_node, deep=False)
            try:
                twice = key in seen
            except TypeError:
                continue  # unhashable: SafeLoader refuses it
            if twice:
                raise _Refusal(
                    f"the key {shown(key)} appears twice in one mapping: keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _children(node: yaml.Node | None) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | str:
    """An integer as YAML 1.2 reads it; text that is not one stays text, for the type check to name."""
    text = str(loader.construct_scalar(node))
    try:
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)  # leading zeros are decimal; past Python's digit limit, a ValueError
    except ValueError:
        return text


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | str:
    text = str(loader.construct_scalar(node))
    body = text.lower().lstrip("+-")
    if body == ".inf":
        return -math.inf if text.startswith("-") else math.inf
    if body == ".nan":
        return math.nan
    try:
        return float(text)
    except ValueError:
        return text


def _yaml_1_2_resolvers() -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    table = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_1_1_ONLY]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for tag, regexp, firsts in ((_INT_TAG, _INT, "-+0123456789"), (_FLOAT_TAG, _FLOAT, "-+.0123456789")):
        for first in firsts:  # after the int resolver, so that 10 stays an int
            table.setdefault(first, []).append((tag, regexp))
    return table


_Loader.yaml_implicit_resolvers = _yaml_1_2_resolvers()
_Loader.add_constructor(_INT_TAG, _construct_int)
_Loader.add_constructor(_FLOAT_TAG, _construct_float)


def _implicit_tag(table: dict[Any, list[tuple[str, re.Pattern[str]]]], value: str) -> str | None:
    """The tag a plain scalar ``value`` resolves to under ``table`` (None: text)."""
    for tag, regexp in table.get(value[:1], []) + table.get(None, []):
        if regexp.match(value):
            return tag
    return None


# ---------------------------------------------------------------------------------------------------
# Reading and writing.


def _message(err: yaml.YAMLError) -> str:
    """One line for a YAML error: where, and what."""
    mark = getattr(err, "mark", None) or getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    if isinstance(err, _Refusal):
        return f"line {mark.line + 1}: {err.message}" if mark is not None else err.message
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"not valid YAML{where} ({_shortened(str(problem))}): fix the syntax"


def load_yaml_text(text: str, source: str, *, error: type[GsaError] = ConfigError) -> Any:
    """Parse one YAML document with the bounds, numbers and duplicate-key check of this module.

    Args:
        text: The document.
        source: What to call it in a message: a path, ``--set KEY=VALUE``, a checkpoint's saved config.
        error: The error to raise (a checkpoint's reader may prefer :class:`~gsa_cli.errors.GsaError`).

    Raises:
        ConfigError: (or ``error``) of one line naming ``source``, if the text is refused.
    """
    if len(text) > MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise error(f"{source}: more than {MAX_BYTES} bytes of YAML: a config is a few kB")
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise error(f"{source}: {_message(err)}") from None
    except RecursionError:
        raise error(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml_file(path: Path) -> Any:
    """Read and parse a YAML file, refusing one over :data:`MAX_BYTES` before reading it all.

    Raises:
        ConfigError: naming ``path``, if it cannot be read, is not UTF-8 text or is refused.
    """
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the preset ({err.strerror})") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: more than {MAX_BYTES} bytes: a preset is a few kB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}): save the file as UTF-8") from None
    return load_yaml_text(text, str(path))


class _Dumper(yaml.SafeDumper):
    """``SafeDumper`` that quotes text which either YAML 1.1 or this module's YAML 1.2 reads otherwise."""

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: tuple[bool, bool]) -> str:
        tag: str = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == _STR_TAG:
            return _implicit_tag(_Loader.yaml_implicit_resolvers, value) or tag
        return tag


def dump_yaml(data: Any) -> str:
    """``yaml.safe_dump(data, sort_keys=False)``, with text quoted where a YAML 1.2 reader needs it."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
