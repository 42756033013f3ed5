"""Training configuration: YAML, overrides, defaults and readable errors."""

from __future__ import annotations

import pytest

from serving.core.errors import ConfigError
from training.config import Config, load_config, parse_override


def test_defaults_are_the_classic_settings():
    config = load_config(overrides={"data.dataset": "digits"})
    aug = config.augmentation
    assert (aug.rotation_degrees, aug.width_shift, aug.height_shift, aug.zoom) == (
        20,
        0.2,
        0.2,
        0.2,
    )
    assert aug.horizontal_flip is True
    assert config.model.arch == "seed-cnn"
    assert config.data.image_size == (64, 64) and config.data.channels == 3


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: digits\ntrain:\n  epochs: 7\n  optimizer: sgd\n")
    config = load_config(path, dict([parse_override("train.epochs=3"), parse_override("seed=5")]))
    assert (config.train.epochs, config.train.optimizer, config.seed) == (3, "sgd", 5)


def test_saved_yaml_loads_back_equal(tmp_path):
    config = load_config(overrides={"data.dataset": "digits", "model.l2": 0.0})
    path = tmp_path / "saved.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data:\n  dataset: digits\ntrain:\n  epochz: 3\n", "unknown config key train.epochz"),
        ("data:\n  dataset: digits\nmodel:\n  arch: alexnet\n", "invalid config model.arch"),
        ("data:\n  dataset: digits\ntrain: [1, 2\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("train:\n  epochs: 3\n", "give a data set"),
        (
            "data:\n  dataset: digits\n  validation_fraction: 0.5\n  test_fraction: 0.45\n",
            "leave at least 10%",
        ),
    ],
)
def test_bad_configs_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    # Our words, not pydantic's: no "Value error," and no "config config".
    assert "Value error" not in caught.value.message and "config config" not in caught.value.message


def test_unreadable_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_override_needs_a_key():
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("epochs")


def test_config_model_rejects_both_sources():
    with pytest.raises(ValueError):
        Config.model_validate({"data": {"dataset": "digits", "data_dir": "/tmp"}})
