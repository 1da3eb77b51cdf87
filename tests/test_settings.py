"""Settings: each variable validated, and combinations that cannot work refused at start."""

from __future__ import annotations

import pytest

from tactful.settings import Settings, SettingsError


def test_defaults_are_valid():
    settings = Settings.from_env({})
    assert settings.server.grpc_port == 50051
    assert settings.privacy.pseudonym_key  # a random one when none is set
    assert Settings.from_env({"TACTFUL_EXPLORATION_BONUS": "0"}).learning.exploration_bonus == 0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TACTFUL_REWARD_WINDOW_SECONDS": "7200", "TACTFUL_DECISION_TTL_SECONDS": "3600"},
         "TACTFUL_REWARD_WINDOW_SECONDS"),
        ({"TACTFUL_REQUEST_ID_TTL_SECONDS": "7200", "TACTFUL_DECISION_TTL_SECONDS": "3600"},
         "TACTFUL_REQUEST_ID_TTL_SECONDS"),
        ({"TACTFUL_LOG_LEVEL": "LOUD"}, "TACTFUL_LOG_LEVEL"),
        ({"TACTFUL_GRPC_PROT": "1"}, "TACTFUL_GRPC_PROT"),  # a typo is named, not ignored
        ({"TACTFUL_CHANNEL_CAPS": "email"}, "TACTFUL_CHANNEL_CAPS"),
        ({"TACTFUL_WORKERS": "2", "TACTFUL_GRPC_PORT": "0"}, "TACTFUL_GRPC_PORT"),
        ({"TACTFUL_WORKERS": "0"}, "TACTFUL_WORKERS"),
        ({"TACTFUL_REDIS_URL": "unix+cluster:///tmp/r.sock"}, "TACTFUL_REDIS_URL"),
        ({"TACTFUL_REDIS_URL": "localhost:6379"}, "TACTFUL_REDIS_URL"),
        ({"TACTFUL_EXPLORATION_BONUS": "-0.1"}, "TACTFUL_EXPLORATION_BONUS"),
        ({"TACTFUL_EXPLORATION_BONUS": "nan"}, "TACTFUL_EXPLORATION_BONUS"),
    ],
)  # fmt: skip
def test_inconsistent_or_malformed_settings_are_refused(env, named):
    with pytest.raises(SettingsError) as error:
        Settings.from_env(env)
    assert named in str(error.value)
