"""Reading, overriding, checking and writing a SPEAR config file.

Example::

    >>> from spear.config import load_config, dump_config
    >>> cfg = load_config(None, overrides=["train.max_steps=5"])
    >>> "max_steps: 5" in dump_config(cfg)
    True
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from spear.cluster.storage import MASK, mask
from spear.config.settings import ConfigError, CorpusConfig, SpearConfig, load_yaml

def secret_fields(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Dotted paths of every secret (``SecretStr``) field, e.g. ``storage.secret_access_key``."""
    model = model or SpearConfig
    found: list[str] = []
    for name, field in model.model_fields.items():
        kinds = [field.annotation, *typing.get_args(field.annotation)]
        if SecretStr in kinds:
            found.append(prefix + name)
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found += secret_fields(kind, prefix + name + ".")
    return found


def secret_values(source: Any) -> list[str]:
    """The secret values held by a config (a :class:`SpearConfig` or its raw mapping), for :func:`mask`."""
    out: list[str] = []
    for path in secret_fields():
        node = source
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, SecretStr):
            node = node.get_secret_value()
        if node is not None and not isinstance(node, (dict, list)):
            out.append(str(node))
    return out


def _secrets_in_yaml_text(text: str) -> list[str]:
    """Values written after a secret field's name in raw YAML (a file that does not parse)."""
    names = "|".join(sorted({p.rsplit(".", 1)[-1] for p in secret_fields()}))
    return [m.group(1) for m in re.finditer(rf"\b(?:{names})\s*[:=]\s*['\"]?([^\s'\"#,}}]+)", text)]


def mask_override(override: str) -> str:
    """An override as error messages show it: the value of a secret field (or of its section) masked."""
    key, sep, _ = override.partition("=")
    k = key.strip()
    if sep and any(p == k or p.startswith(k + ".") for p in secret_fields()):
        return f"{key}={MASK}"
    return override


_PLAIN = {
    "int_parsing": "must be a whole number", "int_type": "must be a whole number",
    "int_from_float": "must be a whole number (no fraction)",
    "float_parsing": "must be a valid number (such as 30 or 2.5)", "float_type": "must be a valid number (such as 30 or 2.5)",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "string_type": "must be text (put it in quotes)", "missing": "is required but missing",
    "extra_forbidden": "unknown field (check the spelling; `spear config init` lists every field)",
    "list_type": "must be a list, such as [a, b]", "tuple_type": "must be a list, such as [a, b]",
    "dict_type": "must be a section of `key: value` fields", "model_type": "must be a section of `key: value` fields",
    "model_attributes_type": "must be a section of `key: value` fields",
}


def _plain(e: dict[str, Any]) -> str:
    """One pydantic error in words for someone who has not read pydantic's documentation."""
    kind, ctx = e["type"], e.get("ctx") or {}
    if kind in _PLAIN:
        return _PLAIN[kind]
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than":
        return f"must be less than {ctx.get('lt')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind in ("literal_error", "enum"):
        return f"must be {ctx.get('expected')}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    msg = str(e["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg.replace("Input should be", "must be", 1)


def describe_validation_error(err: ValidationError, source: str, secrets: Iterable[str] = ()) -> str:
    """A pydantic ValidationError as a config error: one line per field, its dotted path as in the
    file (and ``--set``), what is expected and what was given; secret values masked."""
    secret_paths = set(secret_fields())
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        loc = path or "(top level)"
        got = e.get("input")
        if e["type"] in ("missing", "extra_forbidden") or isinstance(got, (dict, BaseModel)):
            given = ""
        elif path in secret_paths or any(path.startswith(p + ".") for p in secret_paths):
            given = f" (given: {MASK})"
        else:
            given = f" (given: {got!r})"
        lines.append(f"  {loc}: {_plain(e)}{given}")
    return mask("\n".join(lines), secrets)


def _apply_override(data: dict[str, Any], override: str) -> None:
    shown = mask_override(override)
    if "=" not in override:
        raise ConfigError(f"--set {shown!r}: expected section.key=value")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {shown!r}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        why = mask(str(exc), [raw.strip()]) if shown != override else str(exc)
        raise ConfigError(f"--set {shown!r}: value is not valid YAML ({why})") from None
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {shown!r}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def _merge_defaults(defaults: Any, data: Any) -> Any:
    """``data`` laid over ``defaults`` section by section, so that a partial section (a file or a
    ``--set`` giving only ``teachers.speech.batch_seconds``) keeps the section's other defaults."""
    if isinstance(defaults, dict) and isinstance(data, dict):
        merged = dict(defaults)
        for k, v in data.items():
            merged[k] = _merge_defaults(defaults[k], v) if k in defaults else v
        return merged
    return data


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def recipe_names() -> list[str]:
    """The packaged recipes (config/recipes/NAME.yaml): the authors' SPEAR runs, one per size and data mix.

    >>> "spear-base-unified" in recipe_names()
    True
    """
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The file of packaged recipe ``name`` (docs/recipe.md says where each setting comes from).

    >>> recipe_path("spear-large-speech").name
    'spear-large-speech.yaml'
    """
    if name not in recipe_names():
        raise ConfigError(f"no packaged recipe {name!r}: use one of {', '.join(recipe_names())}")
    return RECIPES_DIR / f"{name}.yaml"


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> SpearConfig:
    """Read ``path`` (YAML; None for all defaults), apply ``section.key=value`` overrides, validate.

    ``path`` may also name a packaged recipe (``spear-base-unified``, ...: :func:`recipe_names`)
    when no file of that name exists, so ``spear train spear-base-unified`` runs the
    authors' recipe. Raises :class:`ConfigError` with a message naming the file and each bad field.
    """
    source = "(defaults)"
    data: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file() and source in recipe_names():
            p = recipe_path(source)
            source = f"{source} (packaged recipe {p})"
        if not p.is_file():
            raise ConfigError(f"config file {source} does not exist (packaged recipes, usable by name: "
                              f"{', '.join(recipe_names()) or 'none'})")
        text = p.read_text()
        try:
            loaded = load_yaml(text)
        except yaml.YAMLError as exc:  # its context lines may quote a secret
            raise ConfigError(mask(f"config file {source} is not valid YAML: {exc}", _secrets_in_yaml_text(text))) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {source}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        data = loaded
    for ov in overrides:
        _apply_override(data, ov)
    if overrides:
        source += " with " + " ".join(f"--set {mask_override(ov)}" for ov in overrides)
    secrets = secret_values(data)
    data = _merge_defaults(SpearConfig().model_dump(mode="python", exclude_none=False), data)
    try:
        return SpearConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source, secrets)) from None


def config_to_dict(cfg: BaseModel, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The resolved config as plain data; secrets become '***' (or are revealed if mask_secrets=False)."""
    data = cfg.model_dump(mode="python")

    def walk(model: BaseModel, node: dict[str, Any]) -> None:
        for name, value in list(node.items()):
            attr = getattr(model, name, None)
            if isinstance(attr, SecretStr):
                node[name] = MASK if mask_secrets else attr.get_secret_value()
            elif isinstance(attr, BaseModel) and isinstance(value, dict):
                walk(attr, value)
            elif isinstance(value, tuple):
                node[name] = list(value)
            elif isinstance(attr, list) and attr and isinstance(attr[0], BaseModel):
                for sub_model, sub in zip(attr, value):
                    walk(sub_model, sub)

    walk(cfg, data)
    return data


def dump_config(cfg: SpearConfig, *, mask_secrets: bool = True) -> str:
    """YAML of the resolved config (secrets masked by default)."""
    return yaml.safe_dump(config_to_dict(cfg, mask_secrets=mask_secrets), sort_keys=False)


def commented_default_config() -> str:
    """The default config as YAML with each field's description as a comment (`spear config init`)."""
    lines = [
        "# SPEAR pipeline configuration. Every field is optional; shown are the defaults.",
        "# Override any field on the command line: --set section.key=value",
    ]

    def emit(model_cls: type[BaseModel], instance: BaseModel, indent: int) -> None:
        pad = "  " * indent
        for name, field in model_cls.model_fields.items():
            value = getattr(instance, name)
            if field.description:
                lines.append(f"{pad}# {field.description}")
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:")
                emit(type(value), value, indent + 1)
            else:
                if isinstance(value, SecretStr):
                    value = None
                plain = list(value) if isinstance(value, tuple) else value
                if isinstance(plain, list):  # a list of sections (posttrain.attributes): their non-default fields
                    plain = [v.model_dump(mode="json", exclude_defaults=True) if isinstance(v, BaseModel) else v
                             for v in plain]
                rendered = yaml.safe_dump({name: plain}, default_flow_style=True, width=10_000).strip()
                if rendered.startswith("{") and rendered.endswith("}"):
                    rendered = rendered[1:-1]
                lines.append(f"{pad}{rendered}")
        if model_cls is CorpusConfig:
            lines.append(f"{pad}# e.g.")
            lines.append(f"{pad}# sources:")
            lines.append(f"{pad}#   - {{uri: s3://bucket/libriheavy/, domain: speech}}")
            lines.append(f"{pad}#   - {{uri: s3://bucket/audioset/, domain: audio}}")

    emit(SpearConfig, SpearConfig(), 0)
    return "\n".join(lines) + "\n"
