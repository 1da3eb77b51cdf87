"""The container's promises, checked without a container engine (there is none on the CI
machine): no secrets in the image's layers, and `tactful serve` as the image runs it works on a
read-only root filesystem with only its data volume and /dev/shm writable (what
`docker run --read-only --tmpfs /dev/shm -v tactful-data:/var/lib/tactful` gives it).

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
from test_serve import free_port, wait_serving

from tactful.settings import Settings
from tactful.v1 import decisioning_pb2 as d
from tactful.v1 import decisioning_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL|REDIS_URL", re.IGNORECASE)


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
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "Read-only file system" not in output, output
