"""The base of every config section (unknown keys are errors) and the errors a bad config raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A bad configuration; ``str()`` is one line that names the file and the key."""


class _KeyedError(ValueError):
    """A cross-field error that names the key to blame, relative to the section that raised it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, frozen=False)
