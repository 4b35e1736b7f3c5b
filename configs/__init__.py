"""Typed configs and YAML presets (tiny, small, base, 4b)."""

from selfflow.configs.schema import (
    CodecConfig,
    Config,
    ConfigError,
    ModelConfig,
    TextConfig,
    load_config,
    save_config,
)

__all__ = ["CodecConfig", "Config", "ConfigError", "ModelConfig", "TextConfig", "load_config", "save_config"]
