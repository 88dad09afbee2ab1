"""The one error a bad setting raises, at the bottom of the import graph so every layer can raise it."""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config field holds a value that is not allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field_name, self.value, self.allowed = field_name, value, allowed
        super().__init__(f"config field '{field_name}' = {value!r} is not allowed: expected {allowed}")
