"""One settings object, read from ``TACTFUL_*`` environment variables and validated at start.

Every field documents itself: ``python -m tactful settings`` prints the table the README shows.
Each group of settings has a module (``server``, ``redis``, ``policy``, ``learning``,
``security``), and ``fields`` says how a setting is declared and read; this one holds them
together and checks what is wrong only across groups.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tactful.settings.fields import SettingsError, load_group
from tactful.settings.learning import LearningSettings
from tactful.settings.policy import ContactSettings, PolicySettings, SegmentSettings
from tactful.settings.redis import REDIS_URL_SCHEMES, RedisSettings
from tactful.settings.security import (
    ROLES,
    PrivacySettings,
    SecuritySettings,
    key_digest,
    parse_roles,
)
from tactful.settings.server import ServerSettings

__all__ = [
    "REDIS_URL_SCHEMES",
    "ROLES",
    "ContactSettings",
    "LearningSettings",
    "PolicySettings",
    "PrivacySettings",
    "RedisSettings",
    "SecuritySettings",
    "SegmentSettings",
    "ServerSettings",
    "Settings",
    "SettingsError",
    "iter_fields",
    "key_digest",
    "parse_roles",
    "settings_table",
]


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    contact: ContactSettings = field(default_factory=ContactSettings)
    learning: LearningSettings = field(default_factory=LearningSettings)
    segments: SegmentSettings = field(default_factory=SegmentSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)

    def check_consistency(self) -> None:
        """Settings that are fine alone but wrong together."""
        errors = _consistency_errors(self)
        if errors:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(errors))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every ``TACTFUL_*`` variable; raise SettingsError naming each bad one."""
        env = os.environ if env is None else env
        errors: list[str] = []
        groups = {
            f.name: load_group(f.default_factory, env, errors) for f in dataclasses.fields(cls)
        }
        known = {e for _, meta in iter_fields() for e in [meta["env"]]}
        unknown = sorted(k for k in env if k.startswith("TACTFUL_") and k not in known)
        if unknown:
            errors.append(f"unknown setting(s) {', '.join(unknown)} (typo?)")
        if errors:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(errors))
        settings = cls(**groups)
        settings.check_consistency()
        if not settings.privacy.pseudonym_key:
            privacy = PrivacySettings(pseudonym_key=secrets.token_hex(32))
            settings = dataclasses.replace(settings, privacy=privacy)
        return settings


def _consistency_errors(settings: Settings) -> list[str]:
    policy, learning = settings.policy, settings.learning
    errors = []
    if learning.reward_window_seconds >= policy.decision_ttl_seconds:
        errors.append(
            "TACTFUL_REWARD_WINDOW_SECONDS must be shorter than TACTFUL_DECISION_TTL_SECONDS "
            "(a decision must outlive its reward window to be learned from)"
        )
    if policy.request_id_ttl_seconds > policy.decision_ttl_seconds:
        errors.append(
            "TACTFUL_REQUEST_ID_TTL_SECONDS must not exceed TACTFUL_DECISION_TTL_SECONDS "
            "(a replay needs the logged decision)"
        )
    scheme, sep, _ = settings.redis.url.partition("://")
    if settings.redis.url and (not sep or scheme not in REDIS_URL_SCHEMES):
        errors.append(
            "TACTFUL_REDIS_URL must start with "
            + ", ".join(f"{scheme}://" for scheme in REDIS_URL_SCHEMES)
        )
    if settings.server.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        errors.append("TACTFUL_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    server = settings.server
    if server.workers > 1 and server.grpc_port == 0:
        errors.append(
            "TACTFUL_GRPC_PORT=0 cannot be shared by TACTFUL_WORKERS > 1 processes (each would "
            "pick a port of its own): set a port"
        )
    if server.health_port and server.health_port in (server.grpc_port, server.metrics_port):
        errors.append(
            "TACTFUL_HEALTH_PORT must differ from TACTFUL_GRPC_PORT and TACTFUL_METRICS_PORT"
        )
    security = settings.security
    if security.auth_disabled and security.api_keys:
        errors.append(
            "TACTFUL_AUTH_DISABLED=true ignores TACTFUL_API_KEYS: set one or the other "
            "(a server that looks protected must be)"
        )
    if bool(security.tls_cert_file) != bool(security.tls_key_file):
        errors.append("TACTFUL_TLS_CERT_FILE and TACTFUL_TLS_KEY_FILE must be set together")
    if security.tls_client_ca_file and not security.tls_cert_file:
        errors.append(
            "TACTFUL_TLS_CLIENT_CA_FILE (mutual TLS) needs TACTFUL_TLS_CERT_FILE and "
            "TACTFUL_TLS_KEY_FILE"
        )
    return errors


def iter_fields() -> list[tuple[dataclasses.Field[Any], Mapping[str, Any]]]:
    """Every setting with its metadata (env name, doc, checks), in table order."""
    out: list[tuple[dataclasses.Field[Any], Mapping[str, Any]]] = []
    for group in dataclasses.fields(Settings):
        for f in dataclasses.fields(group.default_factory):  # type: ignore[arg-type,unused-ignore]
            out.append((f, f.metadata))
    return out


def _item(item: Any) -> str:
    if isinstance(item, tuple):
        return f"{item[0]}={item[1]:g}"
    return str(item)


def settings_table() -> str:
    """The configuration table, as Markdown (the README embeds it)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f, meta in iter_fields():
        default = (
            ",".join(_item(i) for i in f.default) if isinstance(f.default, tuple) else f.default
        )
        rows.append(f"| `{meta['env']}` | `{default}` | {meta['doc']} |")
    return "\n".join(rows)
