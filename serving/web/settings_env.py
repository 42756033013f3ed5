"""How serving settings travel between processes: ``IMGCLF_*`` environment variables, which
``imgclf serve`` and the bentofile set and every worker process reads when it loads the
service."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, SecretStr, ValidationError

from serving.core.errors import ConfigError, validation_message

ENV_PREFIX = "IMGCLF_"


def settings_from_env(model: type[BaseModel], environ: Mapping[str, str]):
    """``model`` validated from the variables of ``environ`` that name its fields; the first
    mistake as a ``ConfigError`` naming its variable."""
    values = {
        name: environ[ENV_PREFIX + name.upper()]
        for name in model.model_fields
        if ENV_PREFIX + name.upper() in environ
    }
    try:
        return model.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        name = ENV_PREFIX + str(first["loc"][0]).upper() if first["loc"] else "settings"
        raise ConfigError(f"invalid {name}: {validation_message(first)}") from error


def settings_to_env(settings: BaseModel) -> dict[str, str]:
    """The variables that give ``settings`` again in another process."""
    env = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        if value is not None:
            env[ENV_PREFIX + name.upper()] = str(value)
    return env
