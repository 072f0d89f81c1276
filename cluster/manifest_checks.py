"""Offline validators for the deployment files under cluster/ (used by tests/test_cluster_manifests.py).

Run it before `kubectl apply` / `ray up` too:  python cluster/manifest_checks.py   (exit 1 on errors)

Why each layer exists:
* core Kubernetes kinds (CronJob, Deployment, Service, PVC, StatefulSet, Secret, NetworkPolicy)
  are validated against the real API schemas bundled in ``kubernetes-validate`` (strict mode, so
  a misspelt field fails instead of being silently dropped by the API server);
* KubeRay kinds (RayCluster, RayJob, RayCronJob) have no bundled schema: a compact JSON schema
  written from the ray.io/v1 CRDs (field names, required fields, types) plus the rules the
  KubeRay webhook enforces (name lengths, replica bounds, cron syntax ...); every pod template
  inside them is validated as a core ``PodTemplate``;
* the Ray cluster-launcher YAML goes through Ray's own ``ray-schema.json`` and ``validate_config``.
Every validator returns a list of messages (empty = valid) naming the field and the problem.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]  # cluster/ lives in the repo root
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "launcher" / "aws-gpu.yaml"
K8S_VERSION = "1.30.0"  # oldest Kubernetes the manifests target (CronJob.spec.timeZone is GA from 1.27)
SHARED_MOUNT = "/mnt/shared"
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}
CORE_KINDS = {"CronJob", "Deployment", "Service", "PersistentVolumeClaim", "StatefulSet", "Secret", "NetworkPolicy"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# ---- loading ------------------------------------------------------------------------------------
def load_yaml(path: Path) -> list[dict]:
    """All non-empty documents of a YAML file (safe loader only)."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under cluster/ (the launcher YAML is not one)."""
    return sorted(p for p in CLUSTER.rglob("*.yaml") if p != LAUNCHER)


def yaml_errors(paths: list[Path] | None = None) -> list[str]:
    """Files that do not parse; all_docs() skips them, so callers must report these."""
    errors = []
    for path in [*manifest_files(), LAUNCHER] if paths is None else paths:
        try:
            load_yaml(path)
        except yaml.YAMLError as exc:
            errors.append(f"{path.name}: not valid YAML: {exc}")
    return errors


def all_docs() -> list[tuple[str, dict]]:
    """(label "file#index Kind/name", document) for every manifest document."""
    docs = []
    for path in manifest_files():
        try:
            loaded = load_yaml(path)
        except yaml.YAMLError:
            continue  # reported by yaml_errors()
        docs += [(f"{path.relative_to(CLUSTER)}#{i} {d.get('kind')}/{d.get('metadata', {}).get('name')}", d)
                 for i, d in enumerate(loaded) if isinstance(d, dict)]
    return docs


def docs_of(kind: str, docs: list[tuple[str, dict]] | None = None) -> list[dict]:
    """The documents of one kind (from ``docs`` or freshly loaded)."""
    return [d for _, d in (all_docs() if docs is None else docs) if d.get("kind") == kind]


def only(kind: str, docs: list[tuple[str, dict]] | None = None) -> dict:
    """The single document of a kind; ValueError when there are none or several."""
    found = docs_of(kind, docs)
    if len(found) != 1:
        raise ValueError(f"expected exactly one {kind} under cluster/, found {len(found)}")
    return found[0]


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) in a nested YAML value, depth first."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs a KubeRay document creates (none for other kinds)."""
    spec = doc.get("spec", {})
    found = {"RayCluster": [spec], "RayJob": [spec.get("rayClusterSpec")],
             "RayCronJob": [spec.get("jobTemplate", {}).get("rayClusterSpec")]}.get(doc.get("kind"), [])
    return [s for s in found if isinstance(s, dict)]


def ray_pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) for the head and every worker group of a KubeRay document."""
    out = []
    for spec in cluster_specs(doc):
        out.append(("head", spec.get("headGroupSpec", {}).get("template", {})))
        out += [(g.get("groupName", "?"), g.get("template", {})) for g in spec.get("workerGroupSpecs", [])]
    return out


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template in a document, core or KubeRay."""
    spec = doc.get("spec", {})
    if doc.get("kind") in ("Deployment", "StatefulSet"):
        return [("pod", spec.get("template", {}))]
    if doc.get("kind") == "CronJob":
        return [("pod", spec.get("jobTemplate", {}).get("spec", {}).get("template", {}))]
    return ray_pod_templates(doc)


def env_of(container: dict) -> dict[str, dict]:
    """A container's env entries by name."""
    return {e["name"]: e for e in container.get("env", [])}


# ---- core kinds: kubernetes-validate -------------------------------------------------------------
def k8s_errors(doc: dict) -> list[str]:
    """Strict validation against the Kubernetes API schema of the document's apiVersion/kind."""
    try:
        import kubernetes_validate
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise RuntimeError("kubernetes-validate is missing: pip install kubernetes-validate") from exc
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def pod_template_errors(template: dict, where: str) -> list[str]:
    """Validate an embedded pod template (KubeRay) as a core v1 PodTemplate."""
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    return [f"{where}: {e}" for e in k8s_errors(wrapped)]


# ---- KubeRay kinds: compact schema from the ray.io/v1 CRDs + webhook rules ------------------------
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJ = {"type": "object"}
_CONTAINER = {"type": "object", "required": ["name", "image", "resources"],
              "properties": {"image": {"type": "string", "minLength": 1},
                             "resources": {"type": "object", "minProperties": 1}}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "additionalProperties": False,
                 "properties": {"metadata": _OBJ, "spec": {
                     "type": "object", "required": ["containers"],
                     "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}}}}}
_HEAD = {"type": "object", "required": ["rayStartParams", "template"], "additionalProperties": False,
         "properties": {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE, "headService": _OBJ,
                        "enableIngress": {"type": "boolean"}, "resources": _STR_MAP, "labels": _STR_MAP,
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}}}
_COUNT = {"type": "integer", "minimum": 0}
_WORKER = {"type": "object", "additionalProperties": False,
           "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
           "properties": {"groupName": {"type": "string", "pattern": DNS1035.pattern}, "replicas": _COUNT,
                          "minReplicas": _COUNT, "maxReplicas": _COUNT, "rayStartParams": _STR_MAP,
                          "template": _POD_TEMPLATE, "numOfHosts": {"type": "integer", "minimum": 1},
                          "idleTimeoutSeconds": _COUNT, "scaleStrategy": _OBJ, "suspend": {"type": "boolean"},
                          "resources": _STR_MAP, "labels": _STR_MAP}}
_AUTOSCALER = {"type": "object", "additionalProperties": False, "properties": {
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}, "idleTimeoutSeconds": _COUNT,
    "version": {"enum": ["v1", "v2"]}, "image": {"type": "string"}, "resources": _OBJ, "securityContext": _OBJ,
    "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}, "env": {"type": "array"},
    "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"}}}
_CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "additionalProperties": False, "properties": {
    "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"}, "enableInTreeAutoscaling": {"type": "boolean"},
    "autoscalerOptions": _AUTOSCALER, "headGroupSpec": _HEAD, "workerGroupSpecs": {"type": "array", "items": _WORKER},
    "authOptions": {"type": "object", "additionalProperties": False,
                    "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"}}},
    "headServiceAnnotations": _STR_MAP, "gcsFaultToleranceOptions": _OBJ, "suspend": {"type": "boolean"},
    "managedBy": {"type": "string"}}}
_JOB_SPEC = {"type": "object", "required": ["entrypoint"], "additionalProperties": False, "properties": {
    "entrypoint": {"type": "string", "minLength": 1}, "runtimeEnvYAML": {"type": "string"},
    "rayClusterSpec": _CLUSTER_SPEC, "clusterSelector": _STR_MAP, "shutdownAfterJobFinishes": {"type": "boolean"},
    "ttlSecondsAfterFinished": _COUNT, "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
    "backoffLimit": _COUNT, "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "submitterPodTemplate": _OBJ, "submitterConfig": _OBJ, "jobId": {"type": "string"}, "metadata": _STR_MAP,
    "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
    "entrypointResources": {"type": "string"}, "suspend": {"type": "boolean"}, "deletionStrategy": _OBJ,
    "managedBy": {"type": "string"}}}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "pattern": DNS1035.pattern}}}


def _root(kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": _META,
                           "spec": spec}}


KUBERAY_SCHEMAS = {
    "RayCluster": _root("RayCluster", _CLUSTER_SPEC),
    "RayJob": _root("RayJob", _JOB_SPEC),
    "RayCronJob": _root("RayCronJob", {  # KubeRay 1.6: jobTemplate IS a RayJob spec (no nested .spec)
        "type": "object", "required": ["schedule", "jobTemplate"], "additionalProperties": False,
        "properties": {"schedule": {"type": "string"}, "jobTemplate": _JOB_SPEC, "suspend": {"type": "boolean"},
                       "timeZone": {"type": "string", "minLength": 1}}}),
}
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 38}  # KubeRay appends suffixes to child names


def _cluster_spec_errors(spec: dict, where: str) -> list[str]:
    errors, groups = [], [g.get("groupName") for g in spec.get("workerGroupSpecs", [])]
    if len(groups) != len(set(groups)):
        errors.append(f"{where}: duplicate worker groupName in {groups}")
    for g in spec.get("workerGroupSpecs", []):
        lo, n, hi = g.get("minReplicas", 0), g.get("replicas", 0), g.get("maxReplicas", 0)
        if not lo <= n <= hi:
            errors.append(f"{where}: group {g.get('groupName')}: need minReplicas <= replicas <= maxReplicas, "
                          f"got {lo}, {n}, {hi}")
    if spec.get("authOptions", {}).get("mode") == "token":
        version = tuple(int(x) for x in spec.get("rayVersion", "0.0.0").split("."))
        if version < (2, 52, 0):
            errors.append(f"{where}: authOptions.mode token needs rayVersion >= 2.52.0, got {spec.get('rayVersion')}")
    for name, template in [("head", spec.get("headGroupSpec", {}).get("template", {}))] + [
            (g.get("groupName"), g.get("template", {})) for g in spec.get("workerGroupSpecs", [])]:
        for c in template.get("spec", {}).get("containers", []):
            res = c.get("resources", {})
            for key, limit in res.get("limits", {}).items():
                if "/" in key and key in res.get("requests", {}) and str(res["requests"][key]) != str(limit):
                    errors.append(f"{where}: {name}/{c.get('name')}: extended resource {key} request "
                                  f"{res['requests'][key]} must equal its limit {limit}")
        errors += pod_template_errors(template, f"{where}: {name} pod template")
    return errors


def _job_spec_errors(spec: dict, where: str) -> list[str]:
    errors = []
    if ("rayClusterSpec" in spec) == bool(spec.get("clusterSelector")):
        errors.append(f"{where}: set exactly one of rayClusterSpec and clusterSelector")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    try:
        if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), dict):
            errors.append(f"{where}: runtimeEnvYAML must be a YAML mapping")
    except yaml.YAMLError as exc:
        errors.append(f"{where}: runtimeEnvYAML is not YAML: {exc}")
    if isinstance(spec.get("rayClusterSpec"), dict):
        errors += _cluster_spec_errors(spec["rayClusterSpec"], f"{where}.rayClusterSpec")
    return errors


def kuberay_errors(doc: dict) -> list[str]:
    """CRD-shaped schema first; the webhook-style rules only run on a document that has the right shape."""
    kind = doc.get("kind")
    validator = jsonschema.Draft202012Validator(KUBERAY_SCHEMAS[kind])
    errors = [f"{kind}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in validator.iter_errors(doc)]
    if errors:
        return errors
    name, spec = doc["metadata"]["name"], doc["spec"]
    if len(name) > NAME_LIMITS[kind]:
        errors.append(f"{kind} name {name!r} is longer than {NAME_LIMITS[kind]} characters")
    if kind == "RayCluster":
        errors += _cluster_spec_errors(spec, "spec")
    elif kind == "RayJob":
        errors += _job_spec_errors(spec, "spec")
    else:
        errors += [f"spec.schedule: {e}" for e in cron_errors(spec["schedule"])]
        errors += _job_spec_errors(spec["jobTemplate"], "spec.jobTemplate")
    return errors


def gpu_group_errors(spec: dict) -> list[str]:
    """An autoscaled worker group starting at zero pods whose Ray container asks for nvidia.com/gpu."""
    if spec.get("enableInTreeAutoscaling") is not True:
        return ["enableInTreeAutoscaling must be true"]
    for group in spec.get("workerGroupSpecs", []):
        ray_container = group["template"]["spec"]["containers"][0]
        if int(ray_container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1:
            if group["minReplicas"] == 0 and group["maxReplicas"] >= 1:
                return []
            return [f"GPU group {group['groupName']} must scale from minReplicas 0 to maxReplicas >= 1"]
    return ["no worker group sets resources.limits['nvidia.com/gpu'] on its Ray container"]


# ---- cron -------------------------------------------------------------------------------------------
_MONTHS = {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}
_DAYS = {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}
_CRON_FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day-of-month", 1, 31, {}),
                ("month", 1, 12, _MONTHS), ("day-of-week", 0, 7, _DAYS))


def cron_errors(expr: Any) -> list[str]:
    """Standard 5-field cron (what Kubernetes CronJob and KubeRay RayCronJob parse)."""
    if not isinstance(expr, str):
        return [f"schedule {expr!r} is not a string"]
    if "TZ" in expr:
        return [f"schedule {expr!r}: use the timeZone field, not TZ=/CRON_TZ="]
    fields = expr.split()
    if len(fields) != 5:
        return [f"schedule {expr!r} has {len(fields)} fields; cron needs 5: minute hour day-of-month month day-of-week"]
    errors = []
    for text, (field, lo, hi, names) in zip(fields, _CRON_FIELDS):
        for item in text.split(","):
            base, slash, step = item.partition("/")
            if slash and not (step.isdigit() and int(step) >= 1):
                errors.append(f"{field} {item!r}: step must be a positive integer")
            if base == "*" or (base == "?" and field in ("day-of-month", "day-of-week")):
                continue
            bounds = base.split("-")
            values = [names.get(b.upper(), int(b) if b.isdigit() else None) for b in bounds]
            if len(bounds) > 2 or None in values or not all(lo <= v <= hi for v in values) or values != sorted(values):
                errors.append(f"{field} {item!r} is not a value or range within {lo}-{hi}")
    return errors


# ---- images and pins ----------------------------------------------------------------------------------
def image_errors(ref: str) -> list[str]:
    """An image reference must name a tag other than latest, or a digest."""
    if "@sha256:" in ref:
        return []
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return [f"image {ref!r} has no tag (pulls :latest)"]
    if last.rsplit(":", 1)[1] == "latest":
        return [f"image {ref!r} uses the floating :latest tag"]
    return []


def read_dockerfile(path: Path) -> str:
    """Dockerfile text with line continuations joined."""
    return path.read_text().replace("\\\n", " ")


def dockerfile_pins(text: str) -> dict[str, Requirement]:
    """Every quoted "name[extras]==version" in a Dockerfile, by normalised name."""
    return {canonicalize_name(r.name): r for r in map(Requirement, re.findall(r'"([A-Za-z0-9_.\[\],-]+==[^"]+)"', text))}


def pin_errors(pins: dict[str, Requirement], dependencies: list[str]) -> list[str]:
    """Each pyproject dependency is pinned to a version its specifier allows, with its extras."""
    errors = []
    for dep in map(Requirement, dependencies):
        pin = pins.get(canonicalize_name(dep.name))
        if pin is None:
            errors.append(f"{dep.name}: not pinned in the Dockerfile (pyproject needs {dep})")
            continue
        version = next(iter(pin.specifier)).version
        if not dep.specifier.contains(version, prereleases=True):
            errors.append(f"{dep.name}: Dockerfile pins {version}, pyproject allows {dep.specifier}")
        if not dep.extras <= pin.extras:
            errors.append(f"{dep.name}: Dockerfile pin lacks extras {sorted(dep.extras - pin.extras)}")
    return errors


def pinned_version(pins: dict[str, Requirement], name: str) -> str:
    """The exact version of one pin."""
    return next(iter(pins[name].specifier)).version


# ---- entrypoints ------------------------------------------------------------------------------------
def run_py_invocations(node: Any) -> list[tuple[str, list[str]]]:
    """(where, arguments after sweeps/run.py) for every command line that runs sweeps/run.py."""
    found = []
    for where, value in walk(node):
        if not isinstance(value, str) or "sweeps/run.py" not in value:
            continue
        for line in value.splitlines():
            if "sweeps/run.py" not in line or line.lstrip().startswith("#"):
                continue
            try:
                tokens = shlex.split(line)
            except ValueError as exc:
                found.append((f"{where} (unparseable command line: {exc})", []))
                continue
            start = next(i for i, t in enumerate(tokens) if t.endswith("sweeps/run.py"))
            args = []
            for token in tokens[start + 1:]:
                if token in {"&", "&&", ";", "|", "||"}:
                    break
                args.append(token)
            found.append((f"{where} ({tokens[start]})", args))
    return found


def entrypoint_errors(invocations: list[tuple[str, list[str]]], repo: Path = REPO) -> list[str]:
    """The script, its --space file and every --flag must exist in the repository."""
    errors, run_py = [], repo / "sweeps" / "run.py"
    if not run_py.is_file():
        return ["sweeps/run.py does not exist, but the manifests run it"]
    cli_source = "\n".join(p.read_text() for p in sorted((repo / "sweeps").glob("*.py")))
    for where, args in invocations:
        if "--space" not in args or args.index("--space") + 1 >= len(args):
            errors.append(f"{where}: no --space FILE")
        else:
            space = args[args.index("--space") + 1]
            if not re.fullmatch(r"search_spaces/[\w.-]+\.ya?ml", space):
                errors.append(f"{where}: --space {space!r} is not a search_spaces/*.yaml path")
            elif not (repo / space).is_file():
                errors.append(f"{where}: --space {space} does not exist in the repository")
        errors += [f"{where}: flag {flag} is not defined by sweeps/*.py"
                   for flag in args if flag.startswith("--") and f'"{flag}"' not in cli_source]
    return errors


# ---- cluster launcher -------------------------------------------------------------------------------
def launcher_errors(config: dict) -> list[str]:
    """Ray's own schema and validate_config (as `ray up` runs them), then this project's layout rules."""
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    if errors:
        return errors
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (ValueError, RuntimeError, jsonschema.ValidationError) as exc:
        errors.append(f"ray validate_config: {exc}")
    types = config.get("available_node_types", {})
    if config["provider"].get("type") != "aws":
        errors.append("provider.type must be aws")
    if types.get(config.get("head_node_type"), {}).get("resources", {}).get("GPU"):
        errors.append("the head node type must not offer GPUs")
    for family in ("g5.", "p4d."):
        gpu_types = [t for t in types.values() if t["node_config"].get("InstanceType", "").startswith(family)]
        if not any(t["resources"].get("GPU", 0) >= 1 and t.get("min_workers", 0) == 0 for t in gpu_types):
            errors.append(f"no autoscaled ({family}*) GPU worker type with resources.GPU >= 1 and min_workers 0")
    docker = config.get("docker", {})
    errors += [e for key in ("image", "head_image", "worker_image") if key in docker for e in image_errors(docker[key])]
    return errors


# ---- command line ---------------------------------------------------------------------------------
def main() -> int:
    """Validate every manifest and the launcher config; print one line per problem."""
    errors = yaml_errors()
    for where, doc in all_docs():
        kind = doc.get("kind")
        if kind in KUBERAY_KINDS:
            found = kuberay_errors(doc) + [e for s in cluster_specs(doc) for e in gpu_group_errors(s)]
        elif kind in CORE_KINDS:
            found = k8s_errors(doc)
        else:
            found = [f"kind {kind} has no validator"]
        errors += [f"{where}: {e}" for e in found]
    errors += [f"{LAUNCHER.relative_to(REPO)}: {e}" for e in launcher_errors(yaml.safe_load(LAUNCHER.read_text()))]
    print("\n".join(errors) if errors else "cluster/: all manifests valid")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
