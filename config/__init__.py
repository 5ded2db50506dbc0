"""Configuration loading for every tool (the package's bottom layer; see loading.py)."""

from .loading import ConfigError, config_error_exit, from_dict, load_config, merge, parse_overrides, read_config_file, to_dict

__all__ = ["ConfigError", "from_dict", "to_dict", "read_config_file", "parse_overrides", "merge", "load_config",
           "config_error_exit"]
