"""Flags from OpenFeature (`openfeature-sdk`): whatever provider the application set with
`openfeature.api.set_provider(...)` (for the domain `openfeature_domain`, or the default
one) answers. Load with `plugins = ["watchllm_ext.flags.openfeature_provider"]`.

The evaluation context: targeting key = the user id when there is one, else the project id;
attributes `project_id` and `user_id`. A flag the provider does not know (or a provider in
error) is "no opinion", so the next provider (the built-in one) answers.
"""

from __future__ import annotations

from typing import Any

from openfeature import api
from openfeature.evaluation_context import EvaluationContext

from ..auth import Principal
from ..hookspecs import hookimpl
from ..settings import Settings


class OpenFeatureFlags:
    def __init__(self, settings: Settings) -> None:
        self.domain = settings.openfeature_domain

    @hookimpl
    def feature_enabled(
        self, name: str, principal: Principal, user_id: str | None, default: bool
    ) -> bool | None:
        client = api.get_client(self.domain)
        attributes: dict[str, Any] = {"project_id": principal.project_id}
        if user_id is not None:
            attributes["user_id"] = user_id
        context = EvaluationContext(
            targeting_key=user_id or principal.project_id, attributes=attributes
        )
        details = client.get_boolean_details(name, default, context)
        if details.error_code is not None:
            return None
        return bool(details.value)


def make_plugin(settings: Settings) -> Any:
    return OpenFeatureFlags(settings)
