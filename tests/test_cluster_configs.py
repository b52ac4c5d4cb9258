"""The cluster configurations in configs/cluster/ are valid, install the project one way, point to
shared storage and keep credentials and open ports out.

Ray cluster-launcher YAMLs go through the validation ``ray up`` itself runs: the JSON schema
shipped with Ray (``ray/autoscaler/ray-schema.json``, checked here with ``jsonschema``) on the
file as written, then Ray's ``prepare_config`` (provider defaults merged, the local provider's
node list expanded) and ``validate_config`` on the result. Those two are private functions of
``ray.autoscaler._private.util`` (Ray 2.60): no public API validates without contacting the
cloud. If they move, :func:`_ray_validation` fails and names them.

KubeRay manifests are checked against the field names of KubeRay's ``ray.io/v1`` CRDs, written
down below (no KubeRay code or CRD is part of this repository). They were read from KubeRay's
``ray-operator/config/crd/bases/ray.io_rayclusters.yaml`` and ``ray.io_rayjobs.yaml`` at v1.7.0;
``authOptions`` exists from v1.5.1 on, ``SidecarMode`` from v1.5.0 on.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "configs/cluster"
LAUNCHER_YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if "provider" in yaml.safe_load(p.read_text()))
KUBERAY_YAMLS = sorted(CLUSTER.glob("kuberay-*.yaml"))


def _ray_validation():
    """Ray's own ``prepare_config`` and ``validate_config`` (private, see the module docstring)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as error:  # pragma: no cover - only when Ray moves them
        pytest.fail(
            "ray.autoscaler._private.util.prepare_config / validate_config moved in this Ray "
            f"version ({error}); find the validation `ray up` runs (ray/autoscaler/_private/"
            "commands.py, _bootstrap_config) and use it here"
        )
    return prepare_config, validate_config


def validate_launcher_config(config: dict) -> None:
    """Raises if ``config`` is not a cluster config ``ray up`` accepts."""
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepare_config, validate_config = _ray_validation()
    validate_config(prepare_config(copy.deepcopy(config)))


def test_there_are_launcher_and_kuberay_configs():
    assert {p.name for p in LAUNCHER_YAMLS} == {"aws-gpu.yaml", "local.yaml"}
    assert {p.name for p in KUBERAY_YAMLS} == {"kuberay-raycluster.yaml", "kuberay-rayjob.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_validation(path):
    config = yaml.safe_load(path.read_text())
    validate_launcher_config(config)
    if config["provider"]["type"] == "aws":
        gpu = config["available_node_types"]["ray.worker.gpu"]["node_config"]["InstanceType"]
        assert gpu.startswith(("g", "p")), "the AWS config's workers are GPU instances"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(setup_comands=[]), "Additional properties are not allowed"),
        (lambda c: c["auth"].update(ssh_usr="x"), "Additional properties are not allowed"),
        (lambda c: c.update(max_workers="two"), "is not of type 'integer'"),
    ],
)
def test_rays_validation_rejects_a_broken_config(mutate, message):
    config = yaml.safe_load((CLUSTER / "local.yaml").read_text())
    mutate(config)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_launcher_config(config)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_installs_with_setup_sh_and_keeps_the_dashboard_local(path):
    config = yaml.safe_load(path.read_text())
    assert config["file_mounts"]["~/eqlv2"] == "."
    assert any("bash ~/eqlv2/scripts/setup.sh" in command for command in config["setup_commands"])
    assert any("DETECTRON2_DATASETS=/mnt/shared/datasets" in c for c in config["setup_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start


# --------------------------------------------------------------------------- KubeRay
#: ray.io/v1 field names (KubeRay v1.7.0 CRDs): per object, (allowed keys, required keys, children).
_POD_TEMPLATE = {
    "keys": {"metadata", "spec"},
    "children": {
        "spec": {
            "keys": {
                "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig",
                "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork",
                "hostPID", "hostUsers", "hostname", "imagePullSecrets", "initContainers", "nodeName", "nodeSelector",
                "os", "overhead", "preemptionPolicy", "priority", "priorityClassName", "readinessGates",
                "resourceClaims", "resources", "restartPolicy", "runtimeClassName", "schedulerName",
                "schedulingGates", "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN",
                "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds", "tolerations",
                "topologySpreadConstraints", "volumes",
            },  # fmt: skip
            "required": {"containers"},
            "children": {
                "containers": [{
                    "keys": {
                        "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe",
                        "name", "ports", "readinessProbe", "resizePolicy", "resources", "restartPolicy",
                        "securityContext", "startupProbe", "stdin", "stdinOnce", "terminationMessagePath",
                        "terminationMessagePolicy", "tty", "volumeDevices", "volumeMounts", "workingDir",
                    },  # fmt: skip
                    "required": {"name"},
                    "children": {"env": [{"keys": {"name", "value", "valueFrom"}, "required": {"name"}}]},
                }],
                "volumes": [{
                    "keys": {"name", "persistentVolumeClaim", "emptyDir", "nfs", "secret", "configMap", "csi", "hostPath"},
                    "required": {"name"},
                }],
            },  # fmt: skip
        }
    },
}
_HEAD_GROUP = {
    "keys": {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
             "serviceType", "template"},
    "required": {"template"},
    "children": {"template": _POD_TEMPLATE},
}  # fmt: skip
_WORKER_GROUP = {
    "keys": {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
             "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"},
    "required": {"groupName", "maxReplicas", "minReplicas", "template"},
    "children": {"template": _POD_TEMPLATE},
}  # fmt: skip
_RAY_CLUSTER_SPEC = {
    "keys": {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
             "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
             "upgradeStrategy", "workerGroupSpecs"},
    "required": {"headGroupSpec"},
    "children": {
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": [_WORKER_GROUP],
        "authOptions": {"keys": {"enableK8sTokenAuth", "mode", "secretName"}},
        "autoscalerOptions": {"keys": {"args", "command", "env", "envFrom", "idleTimeoutSeconds", "image",
                                       "imagePullPolicy", "resources", "securityContext", "upscalingMode",
                                       "version", "volumeMounts"}},
    },
}  # fmt: skip
_RAY_JOB_SPEC = {
    "keys": {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
             "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
             "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
             "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"},
    "children": {"rayClusterSpec": _RAY_CLUSTER_SPEC},
}  # fmt: skip
_ENUMS = {"mode": {"disabled", "token"}, "submissionMode": {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}}
KUBERAY_KINDS = {"RayCluster": _RAY_CLUSTER_SPEC, "RayJob": _RAY_JOB_SPEC}


def field_errors(value, schema: dict, where: str) -> list[str]:
    """Names of the fields of ``value`` that ``schema`` does not allow or misses (empty: valid)."""
    if not isinstance(value, dict):
        return [f"{where}: expected an object, got {type(value).__name__}"]
    errors = [f"{where}.{key}: unknown field" for key in sorted(set(value) - schema["keys"])]
    errors += [f"{where}.{key}: required" for key in sorted(schema.get("required", set()) - set(value))]
    errors += [f"{where}.{k}: {value[k]!r} not one of {sorted(e)}" for k, e in _ENUMS.items() if k in value and value[k] not in e]
    for key, child in schema.get("children", {}).items():
        if key not in value:
            continue
        if isinstance(child, list):
            for index, item in enumerate(value[key]):
                errors += field_errors(item, child[0], f"{where}.{key}[{index}]")
        else:
            errors += field_errors(value[key], child, f"{where}.{key}")
    return errors


def kuberay_errors(manifest: dict) -> list[str]:
    """Field errors of a ``ray.io/v1`` RayCluster or RayJob manifest."""
    errors = [f"{k}: unknown top-level field" for k in sorted(set(manifest) - {"apiVersion", "kind", "metadata", "spec"})]
    if manifest.get("apiVersion") != "ray.io/v1" or manifest.get("kind") not in KUBERAY_KINDS:
        return [*errors, f"not a ray.io/v1 RayCluster or RayJob: {manifest.get('apiVersion')} {manifest.get('kind')}"]
    return errors + field_errors(manifest["spec"], KUBERAY_KINDS[manifest["kind"]], "spec")


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


def _containers(manifest: dict) -> list[dict]:
    spec = _cluster_spec(manifest)
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    return [c for t in templates for c in t["spec"]["containers"]]


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=lambda p: p.name)
def test_kuberay_manifest_uses_the_crd_field_names(path):
    manifest = yaml.safe_load(path.read_text())
    assert kuberay_errors(manifest) == []
    spec = _cluster_spec(manifest)
    assert spec["authOptions"] == {"mode": "token"}  # Ray's token authentication on every port
    assert spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # not exposed outside the cluster


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda s: s.update(workerGroupSpec=s.pop("workerGroupSpecs")), "spec.workerGroupSpec: unknown field"),
        (lambda s: s["workerGroupSpecs"][0].pop("minReplicas"), "spec.workerGroupSpecs[0].minReplicas: required"),
        (lambda s: s["authOptions"].update(mode="tokens"), "spec.authOptions.mode: 'tokens' not one of"),
        (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(envs=[]), "containers[0].envs: unknown"),
    ],
)
def test_kuberay_field_check_catches_mistakes(mutate, error):
    manifest = yaml.safe_load((CLUSTER / "kuberay-raycluster.yaml").read_text())
    mutate(manifest["spec"])
    assert any(error in e for e in kuberay_errors(manifest)), kuberay_errors(manifest)


@pytest.mark.parametrize("path", KUBERAY_YAMLS, ids=lambda p: p.name)
def test_kuberay_pods_run_the_project_image_with_shared_storage_and_secret_credentials(path):
    manifest = yaml.safe_load(path.read_text())
    containers = _containers(manifest)
    assert len({c["image"] for c in containers}) == 1
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["DETECTRON2_DATASETS"]["value"] == "/mnt/shared/datasets"
        for name in ("PGPASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert set(env[name]) == {"name", "valueFrom"} and "secretKeyRef" in env[name]["valueFrom"]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
    if manifest["kind"] == "RayJob":
        entrypoint = manifest["spec"]["entrypoint"]
        assert "--storage-path /mnt/shared/ray_results" in entrypoint
        assert re.search(r"--optuna-storage postgresql://\w+@", entrypoint)  # no password in the URL
        assert "--ray-address auto" in entrypoint and "--mlflow-uri http://" in entrypoint


def test_the_image_is_built_by_setup_sh():
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    assert re.search(r"^RUN EQLV2_VENV=/opt/eqlv2-venv bash scripts/setup.sh", dockerfile, re.M)
    assert "PATH=/opt/eqlv2-venv/bin:$PATH" in dockerfile
    ignored = (ROOT / "docker/Dockerfile.dockerignore").read_text().split()
    assert {".git", "datasets", "**/.venv", "eqlv2_runs"} <= set(ignored)


#: Things that look like a credential written into a file.
_SECRET = re.compile(
    r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]|://[^/\s:@]+:[^/\s@]+@|password\s*[:=]\s*['\"]?\w"
    r"|BEGIN [A-Z ]*PRIVATE KEY",
    re.I,
)


@pytest.mark.parametrize("path", sorted(CLUSTER.iterdir()) + [ROOT / "docker/Dockerfile"], ids=lambda p: p.name)
def test_no_credential_and_no_open_bind_in_the_cluster_files(path):
    text = path.read_text()
    assert not _SECRET.search(text), _SECRET.search(text)
    for line in text.splitlines():
        if "0.0.0.0" in line:  # only in the refusal of head_services.sh
            assert "BIND" in line or line.lstrip().startswith("#"), line
