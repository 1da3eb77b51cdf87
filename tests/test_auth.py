"""Security: API keys with roles on a real in-process server and Redis, health and reflection
open without a key, settings refused at start with a clear message, TLS and mutual TLS."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from test_serve import free_port, start, stop, wait_serving

from tactful.__main__ import main
from tactful.settings import SecuritySettings, Settings, SettingsError, key_digest
from tactful.store.redis_store import RedisStore
from tactful.transport import auth
from tactful.transport.server import METHODS, Running, build_server
from tactful.v1 import catalog_pb2, catalog_pb2_grpc, decisioning_pb2_grpc, profiles_pb2_grpc
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import profiles_pb2 as p

from conftest import make_settings, make_store, offer

DECIDE_KEY = "tk_decide-0123456789abcdefghijklmnop"
PROFILE_KEY = "tk_profile-0123456789abcdefghijklmno"
ADMIN_KEY = "tk_admin-0123456789abcdefghijklmnopqr"
API_KEYS = ",".join(
    f"{key_digest(key)}={roles}"
    for key, roles in ((DECIDE_KEY, "decide"), (PROFILE_KEY, "profile"), (ADMIN_KEY, "admin"))
)


def secured(**env: str) -> Settings:
    """make_settings() with the security group read from these variables."""
    security = Settings.from_env({"TACTFUL_API_KEYS": API_KEYS, **env}).security
    return dataclasses.replace(make_settings(), security=security)


@contextlib.contextmanager
def serving(store: RedisStore, settings: Settings) -> Iterator[Running]:
    running = build_server(settings, store, port=0)
    try:
        yield running
    finally:
        running.stop(0)


@pytest.fixture
def channel(store: RedisStore) -> Iterator[grpc.Channel]:
    """A plaintext channel to a server with authentication on."""
    with (
        serving(store, secured()) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch,
    ):
        yield ch


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def code_of(call: Any, *args: Any, **kwargs: Any) -> grpc.StatusCode:
    try:
        call(*args, timeout=10, **kwargs)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def handled(method: str, code: str) -> float:
    service, _, name = method.lstrip("/").rpartition("/")
    return sample(
        "grpc_server_handled_total",
        grpc_type="unary",
        grpc_service=service,
        grpc_method=name,
        grpc_code=code,
    )


# --- keys and roles -----------------------------------------------------------------------


def test_a_call_without_a_key_is_unauthenticated_and_counted(channel):
    decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
    failures = sample("tactful_auth_failures_total", reason="missing_key")
    refused = handled("/tactful.v1.Decisioning/Decide", "UNAUTHENTICATED")
    with pytest.raises(grpc.RpcError) as error:
        decide(d.DecideRequest(user_id="u", channel="web"), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in error.value.details()
    assert sample("tactful_auth_failures_total", reason="missing_key") == failures + 1
    assert handled("/tactful.v1.Decisioning/Decide", "UNAUTHENTICATED") == refused + 1


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((("authorization", "Bearer tk_not-a-key-we-know-of-0123456789"),), "unknown_key"),
        ((("x-api-key", "tk_not-a-key-we-know-of-0123456789"),), "unknown_key"),
        ((("authorization", f"Basic {ADMIN_KEY}"),), "malformed"),
        ((("authorization", "Bearer "),), "malformed"),
        # The digest itself is not a key: settings do not hold anything that opens the door.
        ((("authorization", f"Bearer {key_digest(ADMIN_KEY)}"),), "unknown_key"),
    ],
)
def test_an_unknown_or_malformed_key_is_unauthenticated(channel, metadata, reason):
    before = sample("tactful_auth_failures_total", reason=reason)
    profiles = profiles_pb2_grpc.ProfilesStub(channel)
    code = code_of(profiles.GetProfile, p.GetProfileRequest(user_id="u"), metadata=metadata)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert sample("tactful_auth_failures_total", reason=reason) == before + 1


def test_a_decide_key_decides_but_cannot_touch_catalog_or_profiles(channel):
    decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
    catalog = catalog_pb2_grpc.CatalogStub(channel)
    profiles = profiles_pb2_grpc.ProfilesStub(channel)
    request = d.DecideRequest(user_id="u", channel="web")
    assert code_of(decide, request, metadata=bearer(DECIDE_KEY)) == grpc.StatusCode.OK
    # x-api-key is accepted too.
    assert code_of(decide, request, metadata=(("x-api-key", DECIDE_KEY),)) == grpc.StatusCode.OK

    forbidden = sample("tactful_auth_failures_total", reason="forbidden")
    with pytest.raises(grpc.RpcError) as error:
        catalog.ListOffers(catalog_pb2.ListOffersRequest(), metadata=bearer(DECIDE_KEY))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'admin'" in error.value.details()
    put = catalog_pb2.PutOfferRequest(offer=offer("a"))
    assert code_of(catalog.PutOffer, put, metadata=bearer(DECIDE_KEY)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    get = p.GetProfileRequest(user_id="u")
    assert code_of(profiles.GetProfile, get, metadata=bearer(DECIDE_KEY)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert sample("tactful_auth_failures_total", reason="forbidden") == forbidden + 3


def test_a_profile_key_edits_profiles_but_cannot_erase_them(channel):
    profiles = profiles_pb2_grpc.ProfilesStub(channel)
    key = bearer(PROFILE_KEY)
    preferences = p.SetPreferencesRequest(
        user_id="u", topic_preferences=[p.TopicPreference(topic="yoga", stance=p.STANCE_LIKE)]
    )
    assert code_of(profiles.SetPreferences, preferences, metadata=key) == grpc.StatusCode.OK
    get = p.GetProfileRequest(user_id="u")
    assert code_of(profiles.GetProfile, get, metadata=key) == grpc.StatusCode.OK
    delete = p.DeleteProfileRequest(user_id="u")
    assert code_of(profiles.DeleteProfile, delete, metadata=key) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
    assert code_of(decide, d.DecideRequest(user_id="u", channel="web"), metadata=key) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Nothing was erased.
    assert profiles.GetProfile(get, metadata=key, timeout=10).topic_preferences


def test_an_admin_key_may_call_everything(channel):
    key = bearer(ADMIN_KEY)
    catalog = catalog_pb2_grpc.CatalogStub(channel)
    profiles = profiles_pb2_grpc.ProfilesStub(channel)
    decisioning = decisioning_pb2_grpc.DecisioningStub(channel)
    catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=offer("a")), metadata=key, timeout=10)
    assert catalog.ListOffers(catalog_pb2.ListOffersRequest(), metadata=key, timeout=10).offers
    profiles.SetPreferences(p.SetPreferencesRequest(user_id="u"), metadata=key, timeout=10)
    response = decisioning.Decide(
        d.DecideRequest(user_id="u", channel="web"), metadata=key, timeout=10
    )
    assert [c.offer_id for c in response.choices] == ["a"]
    profiles.DeleteProfile(p.DeleteProfileRequest(user_id="u"), metadata=key, timeout=10)
    catalog.DeleteOffer(catalog_pb2.DeleteOfferRequest(offer_id="a"), metadata=key, timeout=10)


def test_health_and_reflection_need_no_key(store):
    settings = secured()
    settings = dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, reflection=True)
    )
    with (
        serving(store, settings) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "tactful.v1.Decisioning" in services


def test_a_made_up_method_needs_admin_and_grows_no_labels(channel):
    bogus = channel.unary_unary("/tactful.v1.Catalog/Bogus")
    other = channel.unary_unary("/someone.Else/Method")
    assert code_of(bogus, b"") == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(other, b"", metadata=bearer(DECIDE_KEY)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(bogus, b"", metadata=bearer(ADMIN_KEY)) == grpc.StatusCode.UNIMPLEMENTED
    exposition = "\n".join(
        s.labels.get("grpc_method", "") for m in REGISTRY.collect() for s in m.samples
    )
    assert "Bogus" not in exposition and "Method" not in exposition


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_its_role(method):
    expected = {
        "Decisioning": "decide",
        "Profiles": "profile",
        "Catalog": "admin",
    }[method.split("/")[1].rpartition(".")[2]]
    if method == "/tactful.v1.Profiles/DeleteProfile":
        expected = "admin"
    assert auth.required_role(method) == expected


def test_admin_implies_every_role_and_unknown_services_need_admin():
    assert auth.effective_roles(["admin"]) == {"decide", "profile", "admin"}
    assert auth.effective_roles(["decide"]) == {"decide"}
    assert auth.required_role("/grpc.health.v1.Health/Check") is None
    assert auth.required_role("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") is None
    assert auth.required_role("/tactful.v2.Decisioning/Decide") == "admin"


def test_authentication_disabled_says_so_loudly(store, caplog):
    with caplog.at_level(logging.WARNING), serving(store, make_settings()):
        pass
    assert any(
        r.levelno == logging.WARNING and "AUTHENTICATION DISABLED" in r.getMessage()
        for r in caplog.records
    )


# --- settings -----------------------------------------------------------------------------

GOOD = key_digest(ADMIN_KEY)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TACTFUL_API_KEYS": "tk_raw-key-pasted-by-mistake=admin"}, "never the key"),
        ({"TACTFUL_API_KEYS": "sha256:abc=admin"}, "64 hex digits"),
        ({"TACTFUL_API_KEYS": f"md5:{GOOD[7:]}=admin"}, "expected sha256:"),
        ({"TACTFUL_API_KEYS": GOOD}, "expected sha256:<hex digest>=<role>"),
        ({"TACTFUL_API_KEYS": f"{GOOD}=root"}, "unknown role 'root'"),
        ({"TACTFUL_API_KEYS": f"{GOOD}="}, "no role"),
        ({"TACTFUL_API_KEYS": f"{GOOD}=admin,{GOOD.upper()}=decide"}, "entry 2: the same key"),
        ({"TACTFUL_API_KEYS": f"{GOOD}=admin", "TACTFUL_AUTH_DISABLED": "1"}, "one or the other"),
        ({"TACTFUL_AUTH_DISABLED": "maybe"}, "TACTFUL_AUTH_DISABLED"),
        ({"TACTFUL_TLS_CERT_FILE": "/tmp/c.pem"}, "must be set together"),
        ({"TACTFUL_TLS_CLIENT_CA_FILE": "/tmp/ca.pem"}, "mutual TLS"),
    ],
)  # fmt: skip
def test_bad_security_settings_are_refused_with_a_clear_message(env, message):
    with pytest.raises(SettingsError) as error:
        Settings.from_env(env)
    assert message in str(error.value)
    assert "tk_raw-key" not in str(error.value)  # a key pasted by mistake is not echoed


def test_api_keys_parse_to_digests_and_roles():
    entry = f" {GOOD.upper().replace('SHA256', 'sha256')} = decide+profile , "
    security = Settings.from_env({"TACTFUL_API_KEYS": entry}).security
    assert security.api_keys == ((GOOD.removeprefix("sha256:"), ("decide", "profile")),)
    assert not security.auth_disabled  # on by default


def test_a_server_with_auth_on_and_no_keys_or_unreadable_tls_files_does_not_start(store, tmp_path):
    with pytest.raises(SettingsError, match="TACTFUL_API_KEYS is empty"):
        build_server(dataclasses.replace(make_settings(), security=SecuritySettings()), store)
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(SettingsError, match=r"TACTFUL_TLS_CERT_FILE=.*cannot read"):
        build_server(secured(TACTFUL_TLS_CERT_FILE=missing, TACTFUL_TLS_KEY_FILE=missing), store)
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(SettingsError, match="not a PEM file"):
        auth.server_credentials(
            SecuritySettings(tls_cert_file=str(tmp_path / "not.pem"), tls_key_file=missing)
        )


def test_new_key_and_hash_key_print_a_working_entry(capsys):
    assert main(["new-key", "--roles", "decide+profile"]) == 0
    out = capsys.readouterr().out
    key = out.split("stored nowhere): ", 1)[1].split()[0]
    entry = out.split("TACTFUL_API_KEYS entry: ", 1)[1].strip()
    assert entry == f"{key_digest(key)}=decide+profile"
    security = Settings.from_env({"TACTFUL_API_KEYS": entry}).security
    assert security.api_keys[0][1] == ("decide", "profile")

    assert main(["hash-key", key, "--roles", "admin"]) == 0
    assert capsys.readouterr().out.strip() == f"TACTFUL_API_KEYS entry: {key_digest(key)}=admin"
    assert main(["hash-key", "short", "--roles", "admin"]) == 2
    assert main(["new-key", "--roles", "root"]) == 2


# --- TLS ----------------------------------------------------------------------------------


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl binary is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem", "-days", "2",
            "-subj", "/CN=tactful test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for name, extensions in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{name}.ext").write_text(extensions)
        openssl("req", *ec, "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
                "-subj", f"/CN=tactful test {name}")  # fmt: skip
        openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem",
                "-CAkey", d / "ca.key", "-CAcreateserial", "-days", "2",
                "-extfile", d / f"{name}.ext", "-out", d / f"{name}.pem")  # fmt: skip
    return d


def tls_settings(pki: Path, *, mutual: bool) -> Settings:
    env = {
        "TACTFUL_TLS_CERT_FILE": str(pki / "server.pem"),
        "TACTFUL_TLS_KEY_FILE": str(pki / "server.key"),
    }
    if mutual:
        env["TACTFUL_TLS_CLIENT_CA_FILE"] = str(pki / "ca.pem")
    return secured(**env)


def decide_over(channel: grpc.Channel, key: str = DECIDE_KEY) -> grpc.StatusCode:
    decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
    return code_of(decide, d.DecideRequest(user_id="u", channel="web"), metadata=bearer(key))


def test_tls_round_trip_and_plaintext_refused(store, pki):
    with serving(store, tls_settings(pki, mutual=False)) as running:
        target = f"127.0.0.1:{running.port}"
        credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        with grpc.secure_channel(target, credentials) as channel:
            assert decide_over(channel) == grpc.StatusCode.OK
            # TLS authenticates the server, not the caller: a key is still needed.
            decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
            no_key = code_of(decide, d.DecideRequest(user_id="u", channel="web"))
            assert no_key == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(target) as plaintext:
            assert decide_over(plaintext) == grpc.StatusCode.UNAVAILABLE


def test_a_plaintext_health_port_lets_tls_blind_probes_in_and_nothing_else(store, pki):
    """Kubernetes' gRPC probe speaks no TLS: TACTFUL_HEALTH_PORT serves the health service
    alone in plaintext, with the main port's status, and no other service at all."""
    settings = tls_settings(pki, mutual=True)
    settings = dataclasses.replace(
        settings, server=dataclasses.replace(settings.server, health_port=free_port())
    )
    running = build_server(settings, store, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as plaintext:
            check = health_pb2_grpc.HealthStub(plaintext).Check
            for service in ("", "tactful.v1.Decisioning"):
                status = check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            assert decide_over(plaintext, ADMIN_KEY) == grpc.StatusCode.UNIMPLEMENTED
            running.health.enter_graceful_shutdown()  # what SIGTERM does first
            status = check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        running.stop(0)
    with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as gone:
        assert (
            code_of(health_pb2_grpc.HealthStub(gone).Check, health_pb2.HealthCheckRequest())
            == grpc.StatusCode.UNAVAILABLE
        )


def test_mutual_tls_needs_a_client_certificate(store, pki):
    ca = (pki / "ca.pem").read_bytes()
    with serving(store, tls_settings(pki, mutual=True)) as running:
        target = f"127.0.0.1:{running.port}"
        with_cert = grpc.ssl_channel_credentials(
            ca, (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
        )
        with grpc.secure_channel(target, with_cert) as channel:
            assert decide_over(channel) == grpc.StatusCode.OK
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
            assert decide_over(channel) == grpc.StatusCode.UNAVAILABLE
        # A certificate the server's CA did not sign is refused the same way.
        self_signed = grpc.ssl_channel_credentials(
            ca, (pki / "ca.key").read_bytes(), (pki / "ca.pem").read_bytes()
        )
        with grpc.secure_channel(target, self_signed) as channel:
            assert decide_over(channel) == grpc.StatusCode.UNAVAILABLE


# --- `tactful serve` ----------------------------------------------------------------------


def test_serve_with_keys_refuses_keyless_calls_but_answers_probes(tmp_path):
    port = free_port()
    process = start(tmp_path, port, TACTFUL_AUTH_DISABLED="false", TACTFUL_API_KEYS=API_KEYS)
    try:
        wait_serving(port, process)  # the health check carries no key
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert decide_over(channel, "tk_wrong-key-0123456789abcdefgh") == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            assert decide_over(channel) == grpc.StatusCode.OK
    finally:
        output = stop(process)
    assert "3 API key(s)" in output and "AUTHENTICATION DISABLED" not in output
    assert DECIDE_KEY not in output


def test_serve_without_keys_stops_at_once_and_says_what_to_do(tmp_path):
    process = start(tmp_path, free_port(), TACTFUL_AUTH_DISABLED="false")
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 2
    assert "TACTFUL_API_KEYS is empty" in output and "tactful new-key" in output
    assert not (tmp_path / "redis.pid").exists()  # refused before anything started


# --- per-key rate limit ---------------------------------------------------------------------


def test_a_key_past_its_rate_gets_resource_exhausted_with_retry_info(store, redisdb):
    settings = secured(TACTFUL_RATE_LIMIT_PER_SECOND="0.5", TACTFUL_RATE_LIMIT_BURST="3")
    with (
        serving(store, settings) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch,
    ):
        decide = decisioning_pb2_grpc.DecisioningStub(ch).Decide
        request = d.DecideRequest(user_id="u", channel="web")
        codes = [code_of(decide, request, metadata=bearer(DECIDE_KEY)) for _ in range(5)]
        assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        with pytest.raises(grpc.RpcError) as refused:
            decide(request, metadata=bearer(DECIDE_KEY), timeout=10)
        status = rpc_status.from_call(refused.value)
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry)
        assert 0 < retry.retry_delay.ToTimedelta().total_seconds() <= 2.0  # 1 token / 0.5 s
        # Buckets are per key: another key still has its own burst.
        assert code_of(decide, request, metadata=bearer(ADMIN_KEY)) == grpc.StatusCode.OK
        # Refused calls are counted where dashboards look.
        handled = REGISTRY.get_sample_value(
            "grpc_server_handled_total",
            {
                "grpc_type": "unary",
                "grpc_service": "tactful.v1.Decisioning",
                "grpc_method": "Decide",
                "grpc_code": "RESOURCE_EXHAUSTED",
            },
        )
        assert handled is not None and handled >= 3
        # The bucket lives in Redis (shared by every process), under the key's digest only.
        buckets = redisdb.keys("tactful:{rl:*")
        assert len(buckets) == 2 and not any(DECIDE_KEY in b for b in buckets)


def test_without_a_limit_no_bucket_is_kept(store, redisdb, channel):
    decide = decisioning_pb2_grpc.DecisioningStub(channel).Decide
    for _ in range(5):
        decide(d.DecideRequest(user_id="u", channel="web"), metadata=bearer(DECIDE_KEY))
    assert not redisdb.keys("tactful:{rl:*")


def test_a_rate_limit_that_cannot_reach_redis_lets_the_call_through():
    settings = secured(TACTFUL_RATE_LIMIT_PER_SECOND="1")
    dead = make_store("redis://127.0.0.1:1/0", settings)  # nothing listens on port 1
    limiter = auth.rate_limiter(dead, settings.security)
    assert limiter is not None
    before = REGISTRY.get_sample_value("tactful_rate_limit_unchecked_total") or 0.0
    assert limiter(bytes(32)) == 0.0
    assert REGISTRY.get_sample_value("tactful_rate_limit_unchecked_total") == before + 1
