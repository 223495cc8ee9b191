"""The shape of a flag in settings and in the flags file (pydantic only: settings import it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class FlagSpec(BaseModel):
    """A flag's value: `true`/`false`, or a default with overrides per project and per user
    (a user's value beats its project's, which beats the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: bool = False
    projects: dict[str, bool] = Field(default_factory=dict)
    users: dict[str, bool] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bool_shorthand(cls, value: Any) -> Any:
        # `guardian = true` in TOML, `{"guardian": true}` in JSON: the common case.
        return {"default": value} if isinstance(value, bool) else value

    def value(self, project_id: str, user_id: str | None) -> bool:
        if user_id is not None and user_id in self.users:
            return self.users[user_id]
        return self.projects.get(project_id, self.default)
