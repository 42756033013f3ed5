"""One typed training configuration, loaded once from YAML and CLI overrides, saved with the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.core.errors import ConfigError, validation_message

ARCHITECTURES = ("seed-cnn", "mobilenetv2", "resnet50", "vgg16")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: Literal["digits"] | None = Field(None, description="Built-in data set to use.")
    data_dir: Path | None = Field(None, description="Image folder with one sub-folder per class.")
    data_home: Path | None = Field(
        None, description="Where built-in data sets are written (default ~/.cache/imgclf)."
    )
    validation_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    image_size: tuple[int, int] = Field((64, 64), description="Model input height and width.")
    channels: Literal[1, 3] = 3
    resize_filter: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    cache: Literal["auto", "memory", "none"] = Field(
        "auto", description="Cache decoded images in memory; auto does it when they fit."
    )
    cache_limit_bytes: int = Field(2 * 1024**3, gt=0)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError("validation_fraction + test_fraction must leave at least 10% to train")
        if min(self.image_size) < 8:
            raise ValueError("image_size must be at least 8x8")
        return self


class AugmentationConfig(_Section):
    """Defaults are the classic ImageDataGenerator settings; 0 switches a transform off."""

    rotation_degrees: float = Field(20.0, ge=0, le=180)
    width_shift: float = Field(0.2, ge=0, lt=1)
    height_shift: float = Field(0.2, ge=0, lt=1)
    horizontal_flip: bool = True
    zoom: float = Field(0.2, ge=0, lt=1)
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, le=1)
    fill_mode: Literal["nearest", "reflect", "wrap", "constant"] = "nearest"


class ModelConfig(_Section):
    arch: Literal["seed-cnn", "mobilenetv2", "resnet50", "vgg16"] = "seed-cnn"
    weights: str = Field(
        "imagenet",
        description="Backbone weights: imagenet, none, or a local weights file "
        "(for seed-cnn: none or a file).",
    )
    dropout: float = Field(0.3, ge=0, lt=1)
    l2: float = Field(1e-4, ge=0, description="L2 penalty on conv and dense kernels.")
    fine_tune_layers: int = Field(
        20, ge=0, description="Backbone layers unfrozen in the second stage."
    )


class TrainConfig(_Section):
    epochs: int = Field(40, ge=1)
    head_epochs: int = Field(
        5, ge=1, description="First-stage epochs with the backbone frozen (transfer learning)."
    )
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)
    fine_tune_learning_rate: float = Field(1e-5, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    schedule: Literal["constant", "cosine", "plateau"] = "plateau"
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(3, ge=1)
    min_learning_rate: float = Field(1e-6, ge=0)
    early_stopping_patience: int = Field(8, ge=1)
    min_epochs: int = Field(
        10,
        ge=0,
        description="EarlyStopping never stops a stage before this epoch: on a small data set "
        "validation is noisy while BatchNormalization's statistics settle.",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weight: Literal["none", "balanced"] = "none"


class Config(_Section):
    seed: int = 42
    deterministic: bool = Field(
        False, description="TensorFlow op determinism: bit-identical reruns, slower."
    )
    data: DataConfig = DataConfig()
    augmentation: AugmentationConfig = AugmentationConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.data.dataset is None and self.data.data_dir is None:
            raise ValueError("give a data set: --dataset digits or --data PATH")
        if self.data.dataset is not None and self.data.data_dir is not None:
            raise ValueError("give either --dataset or --data, not both")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


#: Built-in data sets' own recipes, used when no --config is given.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML file (optional), apply dotted overrides (``train.epochs: 5``) and validate."""
    return resolve_config(path, overrides)[0]


def resolve_config(
    path: Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    flags: set[str] = frozenset(),
    preset: str | None = None,
) -> tuple[Config, dict[str, str]]:
    """The validated config and, per dotted key, where its value came from: ``default``,
    ``preset <name>`` (a built-in data set's recipe, the base when there is no file),
    ``config file``, ``flag`` (the keys in ``flags``) or ``--set``."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if preset is not None and path is None:
        raw = _read_yaml(PRESETS_DIR / f"{preset}.yaml")
        sources.update(dict.fromkeys(_dotted_keys(raw), f"preset {preset}"))
    if path is not None:
        raw = _read_yaml(Path(path))
        sources.update(dict.fromkeys(_dotted_keys(raw), "config file"))
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
        sources[dotted] = "flag" if dotted in flags else "--set"
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe_validation_error(error)) from error
    every = _dotted_keys(config.model_dump(mode="json"))
    return config, {key: sources.get(key, "default") for key in every}


def annotated_yaml(config: Config, sources: dict[str, str]) -> str:
    """``config.to_yaml()`` with each value's source as a comment (YAML ignores comments, so
    the file still loads as the same config)."""
    sections = {name for name, field in Config.model_fields.items() if _is_section(field)}
    lines, section = [], None
    for line in config.to_yaml().splitlines():
        stripped = line.lstrip()
        if stripped.startswith("- ") or ":" not in stripped:
            lines.append(line)
            continue
        key = stripped.split(":", 1)[0]
        if line == stripped:  # top level
            section = key if key in sections else None
            dotted = key
        else:
            dotted = f"{section}.{key}"
        source = sources.get(dotted)
        lines.append(f"{line}  # {source}" if source and dotted not in sections else line)
    return "\n".join(lines) + "\n"


def _is_section(field) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def _dotted_keys(raw: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {_one_line(error)}") from error
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config {path} must be a mapping, got {type(loaded).__name__}")
    return loaded or {}


def parse_override(text: str) -> tuple[str, Any]:
    """``train.epochs=5`` -> (``train.epochs``, 5); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML") from error


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def _describe_validation_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"unknown config key {where}{more}"
    return f"invalid config{' ' + where if where else ''}: {validation_message(first)}{more}"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]
