"""What every settings section shares: fields may be given by name as well as by env var."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Section"]


class Section(BaseSettings):
    """A section of `Settings` (the composed class repeats this config with its .env file)."""

    model_config = SettingsConfigDict(populate_by_name=True)
