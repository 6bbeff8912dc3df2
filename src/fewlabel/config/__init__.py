"""Typed experiment configs: YAML in, validated pydantic models out.

A config file names its ``task``; the matching schema validates it. Values can be
overridden from the command line with dotted keys (``--set train.max_epochs=3``).
Every error names the offending key.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from fewlabel.config.classification import ClassificationExperiment
from fewlabel.config.segmentation import SegmentationExperiment
from fewlabel.errors import ConfigError

ExperimentConfig = Annotated[
    ClassificationExperiment | SegmentationExperiment,
    Field(discriminator="task"),
]
_ADAPTER: TypeAdapter = TypeAdapter(ExperimentConfig)
_EXPERIMENTS: dict[str, type[BaseModel]] = {
    "classification": ClassificationExperiment,
    "segmentation": SegmentationExperiment,
}

__all__ = [
    "ClassificationExperiment",
    "ExperimentConfig",
    "SegmentationExperiment",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_config",
]


def load_config(path: str | Path, overrides: list[str] | None = None):
    """Read, override and validate a YAML config.

    Args:
        path: the YAML file.
        overrides: ``key.sub=value`` strings; values are parsed as YAML scalars/lists.

    Returns:
        A validated :class:`ClassificationExperiment` or :class:`SegmentationExperiment`.

    Raises:
        ConfigError: if the file is missing, not YAML, or fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from err
    except _DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path))


class _DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping of a config file."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping.

    Plain YAML keeps the last of two ``train:`` sections and drops the first without a word,
    so settings the user wrote would silently not apply.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *defaults": its keys may be replaced by the mapping's own
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKeyError(
                    f"line {key_node.start_mark.line + 1}: the key {key!r} is given twice; the second "
                    "would silently replace the first, so merge them"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Numbers YAML 1.1 reads from text that does not look like one: 001, 0123 (octal 83), 0x1F,
# 12:30 (sexagesimal 750), 1_000. Kept as written: a run named 001 must not become "1", and a
# number field still parses the plain spellings.
_PLAIN_INT = re.compile(r"^-?(0|[1-9][0-9]*)$")
_PLAIN_FLOAT = re.compile(
    r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF|nan|NaN|NAN)$"
)


def _int_as_written(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | str:
    text = str(node.value)
    return loader.construct_yaml_int(node) if _PLAIN_INT.match(text) else text


def _float_as_written(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | str:
    text = str(node.value)
    return loader.construct_yaml_float(node) if _PLAIN_FLOAT.match(text) else text


def _timestamp_as_written(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    return str(node.value)  # no setting is a date: 2024-01-05 is a name


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _int_as_written)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _float_as_written)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_written)


def parse_config(raw: dict[str, Any], source: str = "config"):
    """Validate a config mapping.

    Args:
        raw: the mapping (as read from YAML).
        source: name used in error messages.

    Returns:
        The validated experiment config.

    Raises:
        ConfigError: naming every offending key.
    """
    if "task" not in raw:
        raise ConfigError(f"{source}: missing key 'task' (one of: classification, segmentation)")
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid config\n{_format_errors(err)}") from err


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a config mapping (copied, not modified).

    Args:
        raw: the mapping.
        overrides: strings such as ``train.max_epochs=3`` or ``data.classes=[a,b]``.

    Returns:
        A new mapping with the overrides applied.

    Raises:
        ConfigError: if an override is not of the form ``key=value``.
    """
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_epochs=3")
        key, _, text = item.partition("=")
        keys = key.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r}: empty key segment")
        try:
            value = _parse_value(text, _text_field(raw.get("task"), keys))
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
        node = out
        for part in keys[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def _parse_value(text: str, as_text: bool) -> Any:
    """An override's value: YAML, but all scalars stay text where the key holds text.

    ``run.name=001`` must stay ``"001"`` and ``data.classes=[no, yes]`` must not become booleans,
    which YAML's own typing would make of them. A text value that is not a list or quoted is
    taken as written: YAML would cut ``run.name=exp #2`` at its comment and refuse names
    starting with ``%``, ``@`` or ``*``.
    """
    stripped = text.strip()
    if not stripped or stripped in ("null", "~"):
        return None
    if as_text:
        if stripped[0] in "['\"":
            return yaml.load(text, Loader=yaml.BaseLoader)
        return stripped
    # The config files' loader: 012 is 12 and 0x1F text, in a file and on the command line alike.
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _text_field(task: Any, keys: list[str]) -> bool:
    """Whether the dotted key names a text field (or a list of text) of the task's schema."""
    model: Any = _EXPERIMENTS.get(task) if isinstance(task, str) else None
    for i, key in enumerate(keys):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            return False
        annotation = model.model_fields[key].annotation
        if i < len(keys) - 1:
            model = next(
                (a for a in _members(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None
            )
    members = _members(annotation)
    if str in members:
        return True
    return any(
        typing.get_origin(m) in (list, tuple) and set(typing.get_args(m)) <= {str, Ellipsis} for m in members
    )


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union annotation (``str | None`` -> ``[str, NoneType]``), or itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def dump_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically).

    Args:
        cfg: a validated experiment config.
        path: destination file.
    """
    from fewlabel.utils.files import atomic_write_text

    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    atomic_write_text(Path(path), text)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        # The discriminated union prefixes locations with the task name; users never wrote it.
        loc = [str(p) for p in e["loc"]]
        if loc and loc[0] in ("classification", "segmentation"):
            loc = loc[1:]
        key = ".".join(loc) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")  # pydantic's prefix to our own messages
        lines.append(
            f"  {key}: {msg}"
            + (
                f" (got {e['input']!r})"
                if e["type"] != "extra_forbidden" and "input" in e and not isinstance(e["input"], dict)
                else ""
            )
        )
    return "\n".join(lines)
