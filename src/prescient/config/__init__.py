"""Configuration at the edges: named engine presets and each service's settings."""

from prescient.config.presets import PRESETS, Preset, get_preset, preset_names
from prescient.config.scheduler import (
    DEFAULT_CHOICES,
    SchedulerSettings,
    load_scheduler_settings,
    scheduler_parser,
)
from prescient.config.settings import (
    DefaultChoice,
    DeprecatedSettingWarning,
    Option,
    Setting,
    describe,
    env_var,
)

__all__ = [
    "DEFAULT_CHOICES",
    "PRESETS",
    "DefaultChoice",
    "DeprecatedSettingWarning",
    "Option",
    "Preset",
    "SchedulerSettings",
    "Setting",
    "describe",
    "env_var",
    "get_preset",
    "load_scheduler_settings",
    "preset_names",
    "scheduler_parser",
]
