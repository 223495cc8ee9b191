"""Flags from ConfigCat (`configcat-client`). Load with
`plugins = ["watchllm_ext.flags.configcat_provider"]` and set `configcat_sdk_key`, or only
`configcat_override_file` to run offline from a local JSON file (ConfigCat's local-override
data source, `{"flags": {"guardian": true}}` or a full config JSON with targeting rules).

The ConfigCat user: identifier = the user id when there is one, else the project id; custom
attributes `project_id` and `user_id`, for targeting rules per project. A change is seen
within `configcat_poll_interval_s` (remote config) or at the next evaluation (the override
file is re-read whenever its modification time changes).
"""

from __future__ import annotations

import logging
from typing import Any

import configcatclient
from configcatclient.configcatoptions import ConfigCatOptions
from configcatclient.localfiledatasource import LocalFileFlagOverrides
from configcatclient.overridedatasource import OverrideBehaviour
from configcatclient.pollingmode import PollingMode
from configcatclient.user import User

from ..auth import Principal
from ..hookspecs import hookimpl
from ..settings import Settings, SettingsError

log = logging.getLogger("watchllm.flags")


class ConfigCatFlags:
    def __init__(self, settings: Settings) -> None:
        key = settings.configcat_sdk_key
        override = settings.configcat_override_file
        if key is None and override is None:
            raise SettingsError(
                "the ConfigCat flag provider needs configcat_sdk_key (env"
                " WATCHLLM_CONFIGCAT_SDK_KEY) or configcat_override_file"
                " (env WATCHLLM_CONFIGCAT_OVERRIDE_FILE)"
            )
        # ConfigCat logs each evaluation at INFO ("[5000] Evaluating 'guardian' ..."): a line
        # a Guardian check, every second. Its warnings and errors stay; a level the operator
        # set on its logger is kept.
        configcat_log = logging.getLogger("configcat")
        if configcat_log.level == logging.NOTSET:
            configcat_log.setLevel(logging.WARNING)
        overrides = None
        if override is not None:
            # With no key, the file is the only source (no network at all); with a key, the
            # file's flags beat the remote ones.
            behaviour = (
                OverrideBehaviour.LocalOnly if key is None else OverrideBehaviour.LocalOverRemote
            )
            overrides = LocalFileFlagOverrides(str(override.resolve()), behaviour)
        # ConfigCat keeps one client per key in the process; a local-only client is named
        # after its file, so two apps with two files do not share one.
        self.client = configcatclient.get(
            key or f"watchllm-local:{override.resolve() if override else ''}",
            ConfigCatOptions(
                polling_mode=PollingMode.auto_poll(
                    poll_interval_seconds=settings.configcat_poll_interval_s
                ),
                flag_overrides=overrides,
            ),
        )

    @hookimpl
    def feature_enabled(self, name: str, principal: Principal, user_id: str | None) -> bool | None:
        custom = {"project_id": principal.project_id}
        if user_id is not None:
            custom["user_id"] = user_id
        user = User(user_id or principal.project_id, custom=custom)
        details = self.client.get_value_details(name, None, user)
        if details.error is not None or not isinstance(details.value, bool):
            return None
        return details.value


def make_plugin(settings: Settings) -> Any:
    return ConfigCatFlags(settings)
