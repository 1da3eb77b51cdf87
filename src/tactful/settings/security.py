"""Who may call and how: API keys and their roles, TLS, rate limits, and the key of the
pseudonyms that stand for user ids."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from tactful.settings.fields import setting


@dataclass(frozen=True)
class PrivacySettings:
    pseudonym_key: str = setting(
        "TACTFUL_PSEUDONYM_KEY",
        "",
        "Secret key of the keyed hash that stands for user ids in logs and the decision log. "
        "Empty: a random key per process (pseudonyms then change on restart).",
    )


#: API key roles. ``admin`` implies the others.
ROLES = ("decide", "profile", "admin")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def key_digest(key: str) -> str:
    """The settings form of an API key: ``sha256:<hex digest>``. Keys are random tokens (see
    ``tactful new-key``), so a plain, unsalted hash is enough to keep them out of settings."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def parse_roles(text: str) -> tuple[str, ...]:
    """``decide+profile`` (or ``decide,profile``) -> ("decide", "profile"); ValueError names an
    unknown role."""
    roles = tuple(dict.fromkeys(r.strip() for r in re.split(r"[+,]", text) if r.strip()))
    if not roles:
        raise ValueError(f"no role given (roles: {', '.join(ROLES)})")
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    return roles


def _parse_api_keys(raw: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``sha256:<hex>=decide+profile,sha256:<hex>=admin`` -> ((hex, roles), ...).

    Errors name the entry by position and never echo it: a raw key pasted here by mistake
    must not end up in a log."""
    out: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for n, entry in enumerate((e.strip() for e in raw.split(",") if e.strip()), start=1):
        digest, sep, roles = entry.rpartition("=")
        scheme, colon, hexdigest = digest.strip().partition(":")
        if not sep:
            raise ValueError(
                f"entry {n}: expected sha256:<hex digest>=<role>[+<role>...]; make one with "
                "`python -m tactful new-key --roles decide`"
            )
        hexdigest = hexdigest.strip().lower()
        if not colon or scheme.strip().lower() != "sha256" or not _DIGEST.fullmatch(hexdigest):
            raise ValueError(
                f"entry {n}: expected sha256:<64 hex digits>=<role>; settings hold a key's "
                "hash, never the key (`python -m tactful hash-key --roles ...` prints it)"
            )
        if hexdigest in seen:
            raise ValueError(f"entry {n}: the same key is listed twice")
        seen.add(hexdigest)
        try:
            out.append((hexdigest, parse_roles(roles)))
        except ValueError as exc:
            raise ValueError(f"entry {n}: {exc}") from None
    return tuple(out)


@dataclass(frozen=True)
class SecuritySettings:
    api_keys: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        "TACTFUL_API_KEYS",
        (),
        "API keys the server accepts, by hash, with their roles: comma-separated "
        "`sha256:<hex digest>=<role>[+<role>...]`. Roles: decide (Decisioning), profile "
        "(Profiles except DeleteProfile), admin (everything: Catalog, DeleteProfile). Clients "
        "send `authorization: Bearer <key>` or `x-api-key: <key>`. `tactful new-key` makes one.",
        parse=_parse_api_keys,
        secret=True,
    )
    auth_disabled: bool = setting(
        "TACTFUL_AUTH_DISABLED",
        False,
        "Development only: accept every call without a key (the server logs a warning). "
        "`make serve` sets it.",
    )
    tls_cert_file: str = setting(
        "TACTFUL_TLS_CERT_FILE",
        "",
        "PEM certificate (chain) of the gRPC server. Set with TACTFUL_TLS_KEY_FILE to serve "
        "TLS only; empty: plaintext.",
    )
    tls_key_file: str = setting(
        "TACTFUL_TLS_KEY_FILE", "", "PEM private key of TACTFUL_TLS_CERT_FILE."
    )
    tls_client_ca_file: str = setting(
        "TACTFUL_TLS_CLIENT_CA_FILE",
        "",
        "PEM CA certificate(s): when set, clients must present a certificate signed by one of "
        "them (mutual TLS), as well as an API key.",
    )
    rate_limit_per_second: float = setting(
        "TACTFUL_RATE_LIMIT_PER_SECOND",
        0.0,
        "Calls per second each API key may make, across all server processes (a token "
        "bucket in Redis: one more round trip per call); past it RESOURCE_EXHAUSTED with a "
        "google.rpc.RetryInfo. If Redis cannot be asked, the call goes through. 0: no limit.",
        min=0.0,
    )
    rate_limit_burst: float = setting(
        "TACTFUL_RATE_LIMIT_BURST",
        0.0,
        "Calls a key may make at once above its rate (the bucket's size); 0: one second's "
        "worth of TACTFUL_RATE_LIMIT_PER_SECOND.",
        min=0.0,
    )
