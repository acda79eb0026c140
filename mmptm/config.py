"""Typed run configuration: YAML loading, ``a.b=c`` overrides, validation.

A config file has the sections ``model``, ``tokenizer``, ``objectives``,
``data``, ``train``, ``eval``, ``distributed`` and ``imports``. The fixed
sections are pydantic models; the sections that name a registered component
(``model``, each ``objectives`` entry, each ``data`` stream and the encoder
specs inside ``model``) are validated against that component's constructor
signature. Everything is checked before any work starts, and every error names
the file, the key and the valid choices.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from mmptm.registry import (
    DATASETS,
    ENCODERS,
    EVALUATORS,
    MODELS,
    OBJECTIVES,
    Registry,
    UnknownNameError,
    accepted_parameters,
    did_you_mean,
)


class ConfigError(ValueError):
    """A config file or override is invalid; the message says where and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerConfig(_Section):
    """The tokenizer the text tower reads: a sentencepiece ``.model`` file (``demo:tokenizer`` builds the
    demo one) or a folder holding one, or a CLIP BPE folder (``vocab.json`` + ``merges.txt``, as written
    by ``mmptm convert``)."""

    path: str = "demo:tokenizer"
    context_length: int = Field(77, gt=1)


class TowerOptions(_Section):
    """Options of a model's tower section (``model.text``, ``model.vision`` of ``clip``) beyond its encoder's."""

    init_from: str | None = Field(
        None,
        description="load the tower's weights from this checkpoint or run folder: the same tower of a model "
        "(e.g. a CLIP's text tower) or a checkpoint of the encoder alone (e.g. a multilingual_encoder run)",
    )
    frozen: bool = Field(False, description="train without updating this tower (LiT: a frozen image tower)")
    unfreeze_at_step: int | None = Field(
        None, gt=0, description="with frozen: train the tower from this step on (single-process runs)"
    )


TOWER_OPTION_KEYS = tuple(TowerOptions.model_fields)


class TrainConfig(_Section):
    """Optimisation, precision, logging and checkpointing of one run."""

    max_steps: int = Field(1000, gt=0)
    seed: int = 0
    lr: float = Field(5e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="auto: bf16 on a GPU that supports it, else fp32 (bf16 is emulated, slowly, on most CPUs)"
    )
    grad_accum_steps: int = Field(1, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_checkpointing: bool = False
    compile: bool = False
    cpu: bool = Field(False, description="train on the CPU even when a GPU is present")
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(3, gt=0)
    output_dir: str | None = Field(None, description="default: runs/<config name>")
    objective_sampling: Literal["all", "round_robin", "proportional"] = Field(
        "all",
        description="which objectives each micro-step trains: all (their weighted losses summed), round_robin "
        "(one after the other) or proportional (one, drawn by its objectives[i].ratio; seeded by the step)",
    )
    init_from: str | None = Field(
        None,
        description="start from the weights of this checkpoint or run folder (e.g. one made by `mmptm convert`); "
        "the model section must describe the same architecture; optimizer and step start fresh",
    )
    data_resume: Literal["exact", "next_epoch"] = Field(
        "exact",
        description="--resume continues the interrupted epoch at its next batch (exact: its batches are read "
        "again and dropped) or starts the next epoch (next_epoch: no re-reading, for very long epochs)",
    )
    progress_bar: bool = True
    tensorboard: bool = True


class ZeroShotConfig(_Section):
    """Zero-shot classification with prompt ensembling (Radford et al. 2021, sec 3.1.4)."""

    data: str = Field("demo:val", description="labelled shards, or a folder with one subfolder per class")
    classnames: str | None = Field("demo:classnames", description="None: an image folder's subfolder names")
    templates: str = "demo:templates"
    label_key: str = "cls"
    languages: list[str] | None = Field(None, description="None: every language of the prompt files")
    primary_language: str | None = Field(None, description="None: en if scored, else the first language")
    batch_size: int = Field(256, gt=0)
    num_workers: int = Field(1, ge=0)


class RetrievalConfig(_Section):
    """Zero-shot image-text retrieval, Recall@1/5/10 both ways; an image's captions all count (COCO protocol)."""

    data: str = "demo:val"
    languages: list[str] | None = Field(["en"], description="the caption languages to use; None: all")
    batch_size: int = Field(256, gt=0)
    num_workers: int = Field(1, ge=0)


class EvalConfig(_Section):
    zeroshot: ZeroShotConfig | None = Field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig | None = None
    tasks: list[dict[str, Any]] = Field(
        default_factory=list,
        description="registered evaluators (`mmptm list`), each {name, [prefix], **options}; their metrics are "
        "logged as eval/<key>, or eval/<prefix>/<key> (to run one evaluator twice with different options)",
    )


class DistributedConfig(_Section):
    """Data parallelism when the run is launched as several processes (torchrun, accelerate launch, srun).

    The process count comes from the launcher; one process trains alone.
    """

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model, gradients are averaged; fsdp: parameters, "
        "gradients and optimizer state are sharded over the processes (FSDP2, per transformer block)",
    )
    find_unused_parameters: bool = Field(
        False, description="DDP's option for models whose forward leaves some parameters without gradient"
    )
    cpu_offload: bool = Field(
        False,
        description="fsdp: keep parameter shards, gradients and optimizer state in CPU memory between uses "
        "(GPUs only)",
    )


class Config(_Section):
    """A whole run. ``model``, ``objectives`` and ``data`` are checked against the registries."""

    imports: list[str] = Field(default_factory=list)
    model: dict[str, Any] = Field(default_factory=lambda: {"name": "clip"})
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    objectives: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "contrastive", "data": "train"}])
    data: dict[str, dict[str, Any]] = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    name: str = "run"

    def to_dict(self) -> dict[str, Any]:
        return _plain(self.model_dump(mode="python"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# Constructor parameters the trainer fills at run time; YAML does not set them.
RUNTIME_PARAMETERS: dict[str, set[str]] = {
    "encoder": {"embed_dim", "vocab_size", "pad_id", "eot_id"},
    "model": {"vocab_size", "pad_id", "eot_id", "bos_id", "mask_id"},
    "dataset": {"context"},
    "objective": set(),
    "evaluator": {"model", "context"},
}
# Keys of an ``objectives`` entry that belong to the trainer, not to the objective.
OBJECTIVE_TRAINER_KEYS = {"weight": float, "data": str, "ratio": float}


# --------------------------------------------------------------------------- loading


def bundled_configs_dir() -> Path:
    """The folder of bundled recipes: ``mmptm/configs`` once installed, or ``configs/`` in a checkout.

    (Not ``importlib.resources.files``: ``mmptm.configs`` has no ``__init__.py``,
    and for such a namespace package it returns a ``MultiplexedPath``, not a folder.)
    """
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def bundled_config_names() -> list[str]:
    folder = bundled_configs_dir()
    return sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_config_path(name: str | Path) -> Path:
    """``./NAME`` (with or without ``.yaml``) first, then the bundled configs."""
    candidates = [Path(name)]
    if Path(name).suffix not in (".yaml", ".yml"):
        candidates.append(Path(f"{name}.yaml"))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if Path(name).parent == Path("."):
        for candidate in candidates:
            bundled = bundled_configs_dir() / candidate.name
            if bundled.is_file():
                return bundled
    names = bundled_config_names()
    raise ConfigError(
        f"config file '{name}' not found (looked in the current folder and the bundled configs);"
        f"{did_you_mean(Path(name).name, names)} bundled configs: {', '.join(names) or '(none)'}"
    )


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form a.b=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML: {err}") from None
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_override(tree: dict[str, Any], path: list[str], value: Any, source: str) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, path[: i + 1], source)]
        else:
            if node.get(part) is None:  # a missing section, or one set to null: the override creates it
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override '{source}': '{'.'.join(path[: i + 1])}' is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path, source)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, path: list[str], source: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise ConfigError(
            f"override '{source}': '{'.'.join(path)}' needs an index 0..{len(node) - 1} into that list"
        )
    return int(part)


def import_modules(modules: list[str]) -> None:
    """Import user modules (``pkg.module`` or ``path/to/file.py``) so their components register."""
    for module in modules:
        path = Path(module)
        if path.suffix == ".py":
            if not path.is_file():
                raise ConfigError(f"import '{module}': file not found")
            already = sys.modules.get(path.stem)
            if already is not None and Path(getattr(already, "__file__", "") or "").resolve() == path.resolve():
                continue
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = loaded
            spec.loader.exec_module(loaded)
            continue
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise ConfigError(f"import '{module}': {err}") from None


def _absolute_if_file(module: str) -> str:
    return str(Path(module).resolve()) if module.endswith(".py") else module


def load_config(
    source: str | Path | dict[str, Any],
    overrides: list[str] | None = None,
    imports: list[str] | None = None,
) -> Config:
    """Load, override and validate a run config.

    Args:
        source: a YAML path, a bundled config name (``clip_tiny.yaml``) or a dict.
        overrides: ``a.b=c`` strings applied on top (values parsed as YAML).
        imports: extra modules to import before validation (``--import``).

    Returns:
        The validated :class:`Config`; component sections hold coerced values.

    Raises:
        ConfigError: naming the file, the key and the valid choices.
    """
    import mmptm.data_pipelines  # noqa: F401  (register built-in components)
    import mmptm.encoders  # noqa: F401
    import mmptm.evaluation  # noqa: F401
    import mmptm.objectives  # noqa: F401

    if isinstance(source, dict):
        where, tree, default_name = "<config>", _deep_copy(source), "run"
    else:
        path = resolve_config_path(source)
        where, default_name = str(path), path.stem
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{where}: the top level must be a mapping of sections")
    tree.setdefault("name", default_name)
    override_list = overrides or []
    for path_parts, value in parse_overrides(override_list):
        apply_override(tree, path_parts, value, ".".join(path_parts))
    if override_list:
        where = f"{where} (with overrides {' '.join(override_list)})"

    # Imports given on the command line are recorded in the config, so that a
    # checkpoint's config.yaml rebuilds a model made of user components.
    all_imports = [_absolute_if_file(m) for m in [*(imports or []), *(tree.get("imports") or [])]]
    tree["imports"] = list(dict.fromkeys(all_imports))
    import_modules(tree["imports"])
    try:
        config = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, where, Config)) from None
    if config.train.min_lr > config.train.lr:
        raise ConfigError(
            f"{where}: 'train.min_lr' ({config.train.min_lr}) is above 'train.lr' ({config.train.lr}); the "
            "schedule decays from lr to min_lr, so min_lr must be <= lr"
        )
    validate_components(config, where)
    return config


# --------------------------------------------------------------------------- component validation


def _as_number(value: Any) -> Any:
    """A string that reads as a float (``"1e-3"``, which YAML leaves a string) as that float; else ``value``."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def validate_components(config: Config, where: str) -> None:
    """Check every registered-component section against its constructor; store coerced values."""
    config.model = validate_component(MODELS, config.model, "model", where)
    checked = []
    for i, objective in enumerate(config.objectives):
        trainer_keys = {k: objective[k] for k in OBJECTIVE_TRAINER_KEYS if k in objective}
        options = {k: v for k, v in objective.items() if k not in OBJECTIVE_TRAINER_KEYS}
        for key in ("weight", "ratio"):  # YAML reads 1e-3 (no dot) as a string
            if key in trainer_keys:
                trainer_keys[key] = _as_number(trainer_keys[key])
        checked.append({**validate_component(OBJECTIVES, options, f"objectives.{i}", where), **trainer_keys})
        weight = trainer_keys.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{where}: 'objectives.{i}.weight' must be a number, got {weight!r}")
        ratio = trainer_keys.get("ratio", 1.0)
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio > 0:
            raise ConfigError(
                f"{where}: 'objectives.{i}.ratio' (its share of the micro-steps with "
                f"train.objective_sampling=proportional) must be a number > 0, got {ratio!r}"
            )
        stream = trainer_keys.get("data", "train")
        if stream not in config.data:
            raise ConfigError(
                f"{where}: 'objectives.{i}.data' names data stream '{stream}', which is not defined;"
                f"{did_you_mean(str(stream), config.data)} streams in 'data': {', '.join(config.data) or '(none)'}"
            )
    config.objectives = checked
    config.data = {
        name: validate_component(DATASETS, stream, f"data.{name}", where) for name, stream in config.data.items()
    }
    config.eval.tasks = validate_eval_tasks(config.eval.tasks, where)
    if not config.objectives:
        raise ConfigError(f"{where}: 'objectives' is empty; name at least one of: {', '.join(OBJECTIVES.names())}")


def validate_eval_tasks(tasks: list[Any], where: str) -> list[dict[str, Any]]:
    """Check ``eval.tasks``: each against its evaluator, ``prefix`` (a trainer key) a plain name, no two alike.

    Two tasks of the same evaluator and prefix would log the same metric names, the later silently
    replacing the earlier, so that is refused with the fix (a distinct ``prefix``).
    """
    checked: list[dict[str, Any]] = []
    seen: dict[tuple[Any, Any], int] = {}
    for i, task in enumerate(tasks):
        key = f"eval.tasks.{i}"
        prefix = None
        if isinstance(task, dict) and "prefix" in task:
            task = dict(task)
            prefix = task.pop("prefix")
            if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
                raise ConfigError(
                    f"{where}: '{key}.prefix' must be a name of letters, digits, '_', '.' or '-' (its metrics are "
                    f"logged as eval/<prefix>/<metric>), got {prefix!r}"
                )
        checked.append(validate_component(EVALUATORS, task, key, where))
        if prefix is not None:
            checked[-1]["prefix"] = prefix
        identity = (checked[-1]["name"], prefix)
        if identity in seen:
            raise ConfigError(
                f"{where}: '{key}' and 'eval.tasks.{seen[identity]}' are both '{identity[0]}' tasks"
                + (f" with prefix '{identity[1]}'" if identity[1] else "")
                + ": the later would overwrite the other's metrics; give one a distinct 'prefix' "
                "(logged as eval/<prefix>/<metric>)"
            )
        seen[identity] = i
    return checked


def validate_component(
    registry: Registry, section: Any, key: str, where: str, tower: bool = False
) -> dict[str, Any]:
    """Check a component section against its registered constructor; return it with coerced values.

    Args:
        tower: the section is a model's tower (``TowerSpec``): it may also hold :class:`TowerOptions`.
    """
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping with a 'name', got {section!r}")
    section = dict(section)
    if tower:
        tower_options = {k: section.pop(k) for k in TOWER_OPTION_KEYS if k in section}
        try:
            checked = TowerOptions.model_validate(tower_options)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, where, TowerOptions, prefix=f"{key}.")) from None
        if checked.unfreeze_at_step is not None and not checked.frozen:
            raise ConfigError(f"{where}: '{key}.unfreeze_at_step' needs '{key}.frozen: true'")
        return {**validate_component(registry, section, key, where), **checked.model_dump(exclude_unset=True)}
    if registry is ENCODERS and "name" not in section:
        section["name"] = "timm" if "timm_model" in section else "vit"
    name = section.get("name")
    if name is None:
        raise ConfigError(f"{where}: '{key}.name' is missing; choices: {', '.join(registry.names())}")
    try:
        factory = registry.get(name)
    except UnknownNameError as err:
        raise ConfigError(f"{where}: '{key}.name': {err}") from None

    reserved = RUNTIME_PARAMETERS[registry.kind]
    params = {n: p for n, p in accepted_parameters(factory).items() if n not in reserved}
    hints = _type_hints(factory)
    options = {k: v for k, v in section.items() if k != "name"}
    for option in options:
        if option not in params:
            valid = sorted(params)
            reason = " (filled in at run time)" if option in reserved else ""
            raise ConfigError(
                f"{where}: unknown key '{key}.{option}' for {registry.kind} '{name}'{reason};"
                f"{did_you_mean(option, valid)} valid keys: {', '.join(valid) or '(none)'}"
            )
    fields: dict[str, Any] = {}
    for pname, param in params.items():
        annotation = hints.get(pname, Any)
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[pname] = (annotation, default)
    schema = create_model(  # type: ignore[call-overload]
        f"{name}_options", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True), **fields
    )
    try:
        validated = schema.model_validate(options)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, where, schema, prefix=f"{key}.")) from None
    result: dict[str, Any] = {"name": name}
    for option in options:
        value = getattr(validated, option)
        if _is_encoder_spec(hints.get(option)) and value is not None:
            value = validate_component(ENCODERS, value, f"{key}.{option}", where, _is_tower_spec(hints.get(option)))
        result[option] = value
    # Encoder specs left at their default are validated too, so a bad default fails early.
    for pname in params:
        if pname not in options and _is_encoder_spec(hints.get(pname)) and isinstance(params[pname].default, dict):
            validate_component(ENCODERS, params[pname].default, f"{key}.{pname}", where)
    return result


def _type_hints(factory: Any) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations: fall back to no type checks
        return {}


def _is_tower_spec(annotation: Any) -> bool:
    """Whether an encoder section also takes :class:`TowerOptions` (``TowerSpec``)."""
    return any("mmptm.tower" in getattr(a, "__metadata__", ()) for a in (annotation, *typing.get_args(annotation)))


def _is_encoder_spec(annotation: Any) -> bool:
    """Whether an option is an encoder section: ``EncoderSpec``, or ``EncoderSpec | None`` (optional tower)."""
    return any("mmptm.encoder" in getattr(a, "__metadata__", ()) for a in (annotation, *typing.get_args(annotation)))


def _format_validation_error(err: ValidationError, where: str, schema: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for error in err.errors():
        loc = [str(p) for p in error["loc"]]
        key = prefix + ".".join(loc)
        if error["type"] == "extra_forbidden":
            valid = _valid_keys(schema, loc[:-1])
            lines.append(
                f"unknown key '{key}';{did_you_mean(loc[-1], valid)} valid keys: {', '.join(valid) or '(none)'}"
            )
        elif error["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            lines.append(f"'{key}': {error['msg']} (got {error.get('input')!r})")
    return f"{where}: " + "; ".join(lines)


def _valid_keys(schema: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the (nested) pydantic section at ``loc``."""
    model: Any = schema
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *typing.get_args(annotation)]
        model = next((c for c in candidates if inspect.isclass(c) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields)


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the config dumps as plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _deep_copy(tree: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(_plain(tree)))
