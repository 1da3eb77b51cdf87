"""The container's promises, checked without a container engine (there is none on the CI
machine): no secrets in the image's layers, `tactful serve` as the image runs it works on a
read-only root filesystem with only its data volume and /dev/shm writable (what
`docker run --read-only --tmpfs /dev/shm -v tactful-data:/var/lib/tactful` gives it), and the
HEALTHCHECK's command, `tactful healthcheck`, tells a serving server from a stopped one, with
TLS on or off.

The read-only root is a private mount namespace (``unshare --mount``, root only) in which `/`
is remounted read-only and tmpfs is mounted on the data directory and /dev/shm; the server
gets the Dockerfile's own ENV. Where namespaces are not allowed the test is skipped."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import test_auth
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_auth import openssl, secured, serving
from test_serve import free_port, wait_serving

from tactful.settings import Settings
from tactful.store.redis_store import RedisStore
from tactful.transport.server import build_server
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import decisioning_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL|REDIS_URL", re.IGNORECASE)
pki = test_auth.pki  # the fixture: a test CA with server and client certificates


def runtime_stage() -> str:
    text = DOCKERFILE.read_text()
    return text[text.rindex("\nFROM ") :]


def runtime_env() -> dict[str, str]:
    """The runtime stage's ENV (``ENV A=1 \\`` continued lines), as the server gets it."""
    stage = runtime_stage().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in stage.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line[4:].split())
    return env


def test_no_secret_goes_into_an_image_layer():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith(("ENV ", "ARG ")):
            names = [pair.split("=", 1)[0] for pair in line[4:].split()]
            assert not [n for n in names if SECRET_NAME.search(n)], line
    copies = re.findall(r"^COPY\s+(?!--from)(.+)$", text, flags=re.MULTILINE)
    assert copies and all(re.search(r"\.env|\.pem|\.key|secret", c) is None for c in copies)
    # The build context is only the sources: no .env, keys, data or venv can slip in.
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*"
    allowed = {line for line in ignore if line.startswith("!")}
    assert allowed == {"!pyproject.toml", "!README.md", "!proto/", "!src/"}


def test_the_image_writes_only_to_its_volume_and_dev_shm():
    env = runtime_env()
    assert env["TACTFUL_DATA_DIR"] == "/var/lib/tactful"
    assert env["TACTFUL_METRICS_DIR"].startswith("/dev/shm/")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # no __pycache__ on a read-only root
    assert 'VOLUME ["/var/lib/tactful"]' in runtime_stage()


def test_the_healthcheck_is_tactful_healthcheck():
    """The probe is a command of its own (it knows TLS and TACTFUL_HEALTH_PORT; tested below),
    not a one-liner that asks the main port in plaintext."""
    stage = runtime_stage().replace("\\\n", " ")
    probe = re.search(r"^HEALTHCHECK (.*)$", stage, flags=re.MULTILINE)
    assert probe is not None
    assert probe[1].split("CMD ", 1)[1].strip() == '["python", "-m", "tactful", "healthcheck"]'


def healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    """`tactful healthcheck` as the HEALTHCHECK runs it: the server's TACTFUL_* settings."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TACTFUL_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "tactful", "healthcheck"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.slow
def test_healthcheck_exits_0_while_serving_and_1_once_draining_or_stopped(store: RedisStore):
    running = build_server(secured(), store, port=0)
    try:
        serving_now = healthcheck(TACTFUL_GRPC_PORT=str(running.port))
        assert serving_now.returncode == 0, serving_now.stderr
        assert "SERVING" in serving_now.stdout
        running.health.enter_graceful_shutdown()  # what SIGTERM does first
        draining = healthcheck(TACTFUL_GRPC_PORT=str(running.port))
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stderr
    finally:
        running.stop(0)
    stopped = healthcheck(TACTFUL_GRPC_PORT=str(running.port))
    assert stopped.returncode == 1 and "UNAVAILABLE" in stopped.stderr


@pytest.fixture(scope="module")
def named_elsewhere(pki: Path) -> Path:
    """A server certificate, signed by the test CA, that names a DNS name only: not the
    127.0.0.1 a probe in the container connects to."""
    (pki / "elsewhere.ext").write_text(
        "subjectAltName=DNS:*.tactful.internal\nextendedKeyUsage=serverAuth\n"
    )
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", pki / "elsewhere.key", "-out", pki / "elsewhere.csr",
            "-subj", "/CN=tactful test elsewhere")  # fmt: skip
    openssl("x509", "-req", "-in", pki / "elsewhere.csr", "-CA", pki / "ca.pem",
            "-CAkey", pki / "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", pki / "elsewhere.ext", "-out", pki / "elsewhere.pem")  # fmt: skip
    return pki


@pytest.mark.slow
@pytest.mark.parametrize("certificate", ["server", "elsewhere"])
def test_healthcheck_speaks_tls_when_the_server_does(
    store: RedisStore, named_elsewhere: Path, certificate: str
):
    """With TLS on and no health port, the probe asks the TLS port, trusting the server's own
    certificate, whatever name that certificate carries (127.0.0.1, or *.tactful.internal)."""
    tls = {
        "TACTFUL_TLS_CERT_FILE": str(named_elsewhere / f"{certificate}.pem"),
        "TACTFUL_TLS_KEY_FILE": str(named_elsewhere / f"{certificate}.key"),
    }
    with serving(store, secured(**tls)) as running:
        probe = healthcheck(TACTFUL_GRPC_PORT=str(running.port), **tls)
        assert probe.returncode == 0, probe.stderr
        with (
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as plaintext,
            pytest.raises(grpc.RpcError),  # what the old one-liner asked: no answer
        ):
            health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=2)
    stopped = healthcheck(TACTFUL_GRPC_PORT=str(running.port), **tls)
    assert stopped.returncode == 1


@pytest.mark.slow
def test_with_mutual_tls_healthcheck_needs_the_health_port(store: RedisStore, pki: Path):
    """A probe has no client certificate: with mutual TLS it says to set TACTFUL_HEALTH_PORT,
    and asks that plaintext port once it is set."""
    tls = {
        "TACTFUL_TLS_CERT_FILE": str(pki / "server.pem"),
        "TACTFUL_TLS_KEY_FILE": str(pki / "server.key"),
        "TACTFUL_TLS_CLIENT_CA_FILE": str(pki / "ca.pem"),
    }
    running = build_server(secured(**tls), store, port=0, health_port=free_port())
    try:
        without = healthcheck(TACTFUL_GRPC_PORT=str(running.port), **tls)
        assert without.returncode == 1 and "TACTFUL_HEALTH_PORT" in without.stderr
        port = {
            "TACTFUL_GRPC_PORT": str(running.port),
            "TACTFUL_HEALTH_PORT": str(running.health_port),
        }
        with_port = healthcheck(**port, **tls)
        assert with_port.returncode == 0, with_port.stderr
    finally:
        running.stop(0)


def test_the_image_serves_no_reflection():
    assert runtime_env()["TACTFUL_GRPC_REFLECTION"] == "false"
    assert Settings.from_env({"TACTFUL_GRPC_REFLECTION": "false"}).server.reflection is False


@pytest.fixture
def mount_points() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tro-", dir="/tmp"))
    (path / "data").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read_only_root_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(not read_only_root_available(), reason="needs root and mount namespaces")
def test_serve_runs_on_a_read_only_root_filesystem(mount_points: Path):
    data = mount_points / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TACTFUL_")}
    env.update((k, v) for k, v in runtime_env().items() if k != "PATH")  # the image's venv
    env.update(
        TACTFUL_DATA_DIR=str(data),  # the volume
        TACTFUL_GRPC_HOST="127.0.0.1",
        TACTFUL_GRPC_PORT=str(port),
        TACTFUL_METRICS_PORT=str(free_port()),
        TACTFUL_AUTH_DISABLED="true",
        TACTFUL_REDIS_SOCKET_TIMEOUT_MS="1000",
    )
    script = (
        "set -e; mount --bind / /; mount -o remount,ro,bind /; "
        f"mount -t tmpfs tmpfs {data}; mount -t tmpfs tmpfs /dev/shm; "
        "if touch /etc/tactful-probe 2>/dev/null; then echo 'root is writable'; exit 3; fi; "
        f'exec "{sys.executable}" -m tactful serve'
    )
    process = subprocess.Popen(
        # No --fork: unshare execs sh, which execs tactful: SIGTERM reaches the server itself.
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_serving(port, process, timeout=30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = decisioning_pb2_grpc.DecisioningStub(channel).Decide(
                d.DecideRequest(user_id="ro-user", channel="web"), timeout=5
            )
        assert answer.arm == d.ARM_PERSONALIZED and answer.choices  # the demo catalog
        probe = healthcheck(**{k: v for k, v in env.items() if k.startswith("TACTFUL_")})
        assert probe.returncode == 0, probe.stderr  # the HEALTHCHECK, with the image's ENV
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "Read-only file system" not in output, output
