"""Reading an experiment config: YAML file, dotted `--set` overrides, typed values, `${ENV}` references, and
pydantic's errors turned into one `ConfigError` line that names each bad key and how to fix it.

    from mllm.config import load_config
    cfg = load_config("configs/default.yaml", ["merge.method=ties"], values={"search.n_trials": 30})

After this boundary, code passes the typed `ExperimentConfig` around, never dicts.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mllm.config.schema import ExperimentConfig
from mllm.errors import ConfigError


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`[1, 2]`, `0.5`, `ties`)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r} is not KEY=VALUE", "write e.g. --set merge.method=ties")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    set_value(raw, key, value)


def set_value(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` (`merge.weights`, `data.datasets.0.path`) of a raw config dict to a typed value."""
    parts = key.strip().split(".")
    node: Any = raw
    default: Any = ExperimentConfig().to_dict()  # a missing section or list is filled from the defaults first
    for i, part in enumerate(parts):
        if isinstance(node, dict) and isinstance(default, dict):
            default = default.get(part)
            if part not in node and isinstance(default, dict | list) and not i == len(parts) - 1:
                node[part] = copy.deepcopy(default)
        elif isinstance(node, list) and isinstance(default, list) and part.isdigit() and int(part) < len(default):
            default = default[int(part)]
        else:
            default = None
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: no list entry {part!r} (the list has {len(node)})",
                                  f"use an index below {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                elif not isinstance(node[part], dict | list):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section",
                                      "override the value itself")
                node = node[part]
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section",
                              "override the value itself")


def load_config(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = (),
                values: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment config; every problem is reported in one ConfigError.

    `overrides` are `KEY=VALUE` strings (`--set`, parsed as YAML); `values` are typed values by dotted key (CLI
    options such as `--density 0.4`), applied after them; None values are skipped."""
    source = str(path) if path is not None else "<defaults>"
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found", "pass an existing YAML file, e.g. configs/default.yaml")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", "save it as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}: malformed YAML{where}: {problem}", "fix the YAML syntax there") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}",
                              "start the file with keys such as name:, data:, model:")
    for assignment in overrides:
        apply_override(raw, assignment)
    for key, value in (values or {}).items():
        if value is not None:
            set_value(raw, key, value)
    raw = expand_env(raw)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source), "edit the file or pass --set KEY=VALUE") from None


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, where: str = "") -> Any:
    """Replace `${NAME}` / `${NAME:-default}` in string values with environment variables, so credentials
    (`search.storage: ${MLLM_OPTUNA_STORAGE}`) stay out of config files and `mlflow run -P` parameters."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(m: re.Match[str]) -> str:
        found = os.environ.get(m[1], m[2])
        if found is None:
            raise ConfigError(f"{where}: environment variable {m[1]} is not set",
                              f"export {m[1]}, or write ${{{m[1]}:-default}} or the value itself")
        return found

    return _ENV_REF.sub(lookup, value)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names (by alias) of the section at `loc`, walking ExperimentConfig's annotations."""
    model: Any = ExperimentConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        candidates = [ann, *(inner or ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line: every problem pydantic found, each with its dotted key (and what is allowed)."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            problems.append(f"unknown key '{key}' (remove it; allowed here: {', '.join(allowed)})")
        elif e["type"] == "missing":
            problems.append(f"missing key '{key}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = e.get("input")
            if key == "<top level>" and isinstance(shown, dict):  # a check across sections: its message names them
                problems.append(msg)
                continue
            got = f" (got {shown!r})" if not isinstance(shown, dict | list) or key == "<top level>" else ""
            problems.append(f"{key}: {msg}{got}")
    return f"{source}: invalid config: " + "; ".join(problems)
