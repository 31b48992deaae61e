"""Configuration at the edges: named engine presets (and, later, each service's settings)."""

from prescient.config.presets import PRESETS, Preset, get_preset, preset_names

__all__ = ["PRESETS", "Preset", "get_preset", "preset_names"]
