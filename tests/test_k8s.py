"""deploy/k8s: the manifests are valid Kubernetes objects (kubernetes-validate's offline
OpenAPI schemas, strict: unknown fields are errors) and keep the invariants production relies
on: gRPC probes on the gRPC port, hardened pods, resources, a drain that fits the grace
period, a headless Service, PDB/HPA/Services that select the server pods (and not the
learner), and only settings tactful knows, with values it accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tactful.settings import Settings, SettingsError, iter_fields, key_digest
from tactful.v1 import decisioning_pb2

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "Dockerfile"

#: Files that are on purpose not resources of the kustomization (see its comments).
NOT_APPLIED = {"secret.template.yaml", "podmonitor.yaml"}
#: Kinds kubernetes-validate has no schema for (not built into Kubernetes).
CUSTOM_KINDS = {"Kustomization", "PodMonitor"}
#: Oldest Kubernetes the manifests claim (gRPC probes: beta in 1.24, GA in 1.27) that
#: kubernetes-validate ships schemas for, and the newest it ships.
K8S_VERSIONS = ("1.25", kubernetes_validate.latest_version())
#: Environment variables that are not tactful settings but may be set.
NON_TACTFUL_ENV = {"PROMETHEUS_MULTIPROC_DIR"}
SETTINGS_ENV = {meta["env"] for _, meta in iter_fields()}
DECISIONING = decisioning_pb2.DESCRIPTOR.services_by_name["Decisioning"].full_name


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]


def every_doc() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load(path.name)]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in every_doc() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


SERVER = one("Deployment", "tactful")
LEARNER = one("Deployment", "tactful-learner")
CONFIG = one("ConfigMap", "tactful-config")["data"]
SECRET = one("Secret", "tactful-secrets")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match_labels.items())


def port(deployment: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    return int(ports[name])


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def secret_refs(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env = container(deployment).get("env", [])
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}


def image_user() -> str:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert users, "the Dockerfile sets no USER: the image would run as root"
    return str(users[-1].split(":")[0])


def test_the_kustomization_applies_every_manifest_but_the_optional_ones():
    (kustomization,) = load("kustomization.yaml")
    resources = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert resources == files - NOT_APPLIED
    assert one("Namespace", kustomization["namespace"])
    images = {image["name"] for image in kustomization["images"]}
    for deployment in (SERVER, LEARNER):
        assert container(deployment)["image"].split(":")[0] in images


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_passes_the_kubernetes_schema(version: str):
    checked = 0
    for name, doc in every_doc():
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {path}: {exc.message}")
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("deployment", [SERVER, LEARNER], ids=["server", "learner"])
def test_pods_are_hardened(deployment: dict[str, Any]):
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert str(pod["securityContext"]["runAsUser"]) == image_user() != "0"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # Service links would put TACTFUL_SERVICE_HOST, TACTFUL_PORT ... (from the Service named
    # tactful) in the environment, and tactful refuses unknown TACTFUL_* variables.
    assert pod["enableServiceLinks"] is False
    # Writable paths are emptyDirs only, /tmp among them.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts
    assert all("emptyDir" in volumes[name] for name in mounts.values())


def test_the_image_runs_as_a_numeric_non_root_user():
    # Numeric: runAsNonRoot cannot check a user name and refuses to start the container.
    assert image_user().isdigit() and image_user() != "0"


@pytest.mark.parametrize("deployment", [SERVER, LEARNER], ids=["server", "learner"])
def test_resources_are_requested_and_memory_is_limited(deployment: dict[str, Any]):
    resources = container(deployment)["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_server_probes_are_grpc_on_the_grpc_port():
    grpc_port = port(SERVER, "grpc")
    assert grpc_port == int(CONFIG["TACTFUL_GRPC_PORT"])
    c = container(SERVER)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe
        assert c[probe]["grpc"].get("service", "") in ("", DECISIONING), probe


def test_server_drains_within_its_grace_period():
    pod = SERVER["spec"]["template"]["spec"]
    pre_stop = container(SERVER)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + float(CONFIG["TACTFUL_SHUTDOWN_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > drain


def test_server_replicas_and_scaling():
    assert SERVER["spec"]["replicas"] >= 2
    hpa = one("HorizontalPodAutoscaler", "tactful")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", SERVER["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"


def test_workers_match_the_cpu_request():
    """One server process per requested core (TACTFUL_WORKERS, 1 when unset)."""
    workers = int(CONFIG.get("TACTFUL_WORKERS", "1"))
    assert workers == cores(container(SERVER)["resources"]["requests"]["cpu"])


def test_services_pdb_and_monitor_select_the_right_pods():
    server, learner = pod_labels(SERVER), pod_labels(LEARNER)
    assert selects(SERVER["spec"]["selector"]["matchLabels"], server)
    assert selects(LEARNER["spec"]["selector"]["matchLabels"], learner)
    for name in ("tactful-headless", "tactful"):
        service = one("Service", name)
        assert selects(service["spec"]["selector"], server), name
        assert not selects(service["spec"]["selector"], learner), name
        (grpc_port,) = service["spec"]["ports"]
        assert grpc_port["targetPort"] == "grpc" and grpc_port["port"] == port(SERVER, "grpc")
    assert one("Service", "tactful-headless")["spec"]["clusterIP"] == "None"
    pdb = one("PodDisruptionBudget", "tactful")
    assert selects(pdb["spec"]["selector"]["matchLabels"], server)
    assert not selects(pdb["spec"]["selector"]["matchLabels"], learner)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    # The PodMonitor scrapes both under job="tactful", the job alerts.yml expects.
    monitor = one("PodMonitor", "tactful")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for deployment, labels in ((SERVER, server), (LEARNER, learner)):
        assert selects(monitor["spec"]["selector"]["matchLabels"], labels)
        assert labels[monitor["spec"]["jobLabel"]] == "tactful"
        assert port(deployment, endpoint["port"]) == int(CONFIG["TACTFUL_METRICS_PORT"])
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == int(CONFIG["TACTFUL_METRICS_PORT"])


def test_one_learner_and_servers_without_one():
    assert LEARNER["spec"]["replicas"] == 1
    c = container(LEARNER)
    assert [*c["command"], *c["args"]][-1] == "learn"
    assert [*container(SERVER)["command"], *container(SERVER)["args"]][-1] == "serve"
    # Both read the ConfigMap: they must agree on the feature space of the model.
    for deployment in (SERVER, LEARNER):
        refs = [e["configMapRef"]["name"] for e in container(deployment)["envFrom"]]
        assert refs == ["tactful-config"]
    assert CONFIG["TACTFUL_EMBEDDED_LEARNER"] == "false"
    assert CONFIG["TACTFUL_LOAD_DEMO_CATALOG"] == "false"
    assert CONFIG["TACTFUL_GRPC_REFLECTION"] == "false"  # the API is not advertised


def test_secrets_come_from_the_secret_and_are_required():
    server_refs, learner_refs = secret_refs(SERVER), secret_refs(LEARNER)
    assert set(server_refs) == {"TACTFUL_REDIS_URL", "TACTFUL_API_KEYS", "TACTFUL_PSEUDONYM_KEY"}
    assert set(learner_refs) == {"TACTFUL_REDIS_URL"}
    for name, ref in (server_refs | learner_refs).items():
        assert ref["name"] == SECRET["metadata"]["name"] and ref["key"] == name
        assert not ref.get("optional", False), name
        assert ref["key"] in SECRET["stringData"], name
    assert not set(CONFIG) & set(SECRET["stringData"]), "a secret in the ConfigMap"


def test_every_variable_set_is_a_tactful_setting():
    for deployment in (SERVER, LEARNER):
        names = set(CONFIG) | {e["name"] for e in container(deployment).get("env", [])}
        unknown = names - SETTINGS_ENV - NON_TACTFUL_ENV
        assert not unknown, f"{deployment['metadata']['name']}: not tactful settings: {unknown}"


def test_tactful_accepts_the_configuration():
    env = dict(CONFIG)
    env.update(
        TACTFUL_REDIS_URL="rediss://tactful:secret@redis:6379/0",
        TACTFUL_API_KEYS=key_digest("k" * 32) + "=decide",
        TACTFUL_PSEUDONYM_KEY="0" * 64,
    )
    settings = Settings.from_env(env)
    assert settings.redis.url and not settings.learning.embedded_learner
    assert settings.server.max_connection_age_seconds > 0
    # The template's placeholders are refused: applied by mistake, nothing starts.
    with pytest.raises(SettingsError, match="TACTFUL_API_KEYS"):
        Settings.from_env({**env, "TACTFUL_API_KEYS": SECRET["stringData"]["TACTFUL_API_KEYS"]})
