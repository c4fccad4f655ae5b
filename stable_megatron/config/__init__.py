"""Run configuration: nested dataclasses loaded from a YAML recipe plus dotted overrides.

- `sections`: the schema, one dataclass per recipe section and `Config`;
- `loading`: recipe YAML (`base:` chains) + `a.b=c` overrides -> a typed `Config`;
- `rules`: `validate(cfg, world_size)`, the rules that span sections and the registered
  methods' own rules (each method's keys and rules live in stable_megatron/methods/).

Every user error (unknown key, wrong type, invalid combination) raises `ConfigError` with a
single line naming the field and what would be valid.
"""

from stable_megatron.config.loading import (
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
    read_recipe,
)
from stable_megatron.config.rules import resolve_vocab, validate
from stable_megatron.config.sections import (
    RECOMPUTE_MODES,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    MetricsConfig,
    ModelConfig,
    ParallelConfig,
    RecomputeMode,
    StabilityConfig,
    TrainConfig,
    WarningConfig,
    as_dict,
    base_model_keys,
)

__all__ = [
    "RECOMPUTE_MODES", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
    "LoggingConfig", "MetricsConfig", "ModelConfig", "ParallelConfig", "RecomputeMode",
    "StabilityConfig", "TrainConfig", "WarningConfig", "as_dict", "base_model_keys",
    "config_from_dict", "dump_config", "load_config", "parse_overrides", "read_recipe",
    "resolve_vocab", "validate",
]
