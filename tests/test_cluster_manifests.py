"""Static checks of the deployment files under cluster/ (no cluster, no network, a few seconds).

The validators live in cluster/manifest_checks.py (usable before `kubectl apply`); this file runs
them on every manifest, adds the cross-checks that tie the files to the repo (entrypoints name
existing scripts, search spaces and CLI flags; images are pinned and carry the release versions;
Dockerfile pins satisfy pyproject; Services, Secrets and PVCs referenced by pods exist), and
feeds every validator a broken copy to prove it can fail.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet

_SPEC = importlib.util.spec_from_file_location(
    "manifest_checks", Path(__file__).resolve().parents[1] / "cluster" / "manifest_checks.py")
mc = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(mc)

REPO, CLUSTER, LAUNCHER, SHARED_MOUNT = mc.REPO, mc.CLUSTER, mc.LAUNCHER, mc.SHARED_MOUNT
DOCS = mc.all_docs()


def _docs_of(kind: str) -> list[dict]:
    return mc.docs_of(kind, DOCS)


def _one(kind: str) -> dict:
    return mc.only(kind, DOCS)


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# ---- the manifests ----------------------------------------------------------------------------------
def _ok(errors: list[str]) -> None:
    """Fail with every message, one per line (pytest would truncate a list diff)."""
    assert not errors, "\n".join(errors)


CORE_DOCS = [(i, d) for i, d in DOCS if d.get("kind") in mc.CORE_KINDS]
RAY_DOCS = [(i, d) for i, d in DOCS if d.get("kind") in mc.KUBERAY_KINDS]


def test_every_yaml_file_parses_into_known_kinds() -> None:
    assert mc.manifest_files(), "no manifests under cluster/"
    _ok(mc.yaml_errors())
    for path in mc.manifest_files():
        docs = mc.load_yaml(path)
        assert docs, f"{path}: no YAML document"
        for doc in docs:
            assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= doc.keys(), \
                f"{path}: every document needs apiVersion, kind and metadata"
            assert doc["kind"] in mc.CORE_KINDS | mc.KUBERAY_KINDS, f"{path}: kind {doc['kind']} has no validator here"


@pytest.mark.parametrize("doc", [d for _, d in CORE_DOCS], ids=[i for i, _ in CORE_DOCS])
def test_core_kinds_match_the_kubernetes_schema(doc: dict) -> None:
    _ok(mc.k8s_errors(doc))


@pytest.mark.parametrize("doc", [d for _, d in RAY_DOCS], ids=[i for i, _ in RAY_DOCS])
def test_kuberay_kinds_match_the_crd_schema_and_webhook_rules(doc: dict) -> None:
    _ok(mc.kuberay_errors(doc))
    for spec in mc.cluster_specs(doc):
        _ok(mc.gpu_group_errors(spec))


def test_the_deployment_has_each_piece() -> None:
    for kind in ("RayCluster", "RayJob", "RayCronJob", "CronJob", "StatefulSet"):
        _one(kind)
    assert _one("RayJob")["spec"]["shutdownAfterJobFinishes"] is True
    assert any(d["spec"]["accessModes"] == ["ReadWriteMany"] for d in _docs_of("PersistentVolumeClaim"))
    assert {d["metadata"]["name"] for d in _docs_of("Deployment")} == {"mlflow"}
    assert "mlflow" in {d["metadata"]["name"] for d in _docs_of("Service")}


def _mlflow_url() -> str:
    svc = next(d for d in _docs_of("Service") if d["metadata"]["name"] == "mlflow")
    return f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


def test_every_ray_pod_gets_shared_storage_tracking_and_the_project_image() -> None:
    pvcs = {d["metadata"]["name"]: d for d in _docs_of("PersistentVolumeClaim")}
    pins = mc.dockerfile_pins(mc.read_dockerfile(CLUSTER / "Dockerfile"))
    image = f"registry.example.com/peft-sweeps:{_pyproject()['project']['version']}"
    for _, doc in RAY_DOCS:
        where = doc["metadata"]["name"]
        for spec in mc.cluster_specs(doc):
            assert spec["rayVersion"] == mc.pinned_version(pins, "ray"), f"{where}: rayVersion differs from the image's ray"
        for group, template in mc.ray_pod_templates(doc):
            pod, ray = template["spec"], template["spec"]["containers"][0]
            assert ray["image"] == image, f"{where}/{group}: image {ray['image']} != {image}"
            mount = next((m for m in ray.get("volumeMounts", []) if m["mountPath"] == SHARED_MOUNT), None)
            assert mount, f"{where}/{group}: nothing mounted at {SHARED_MOUNT}"
            volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            assert claim in pvcs and pvcs[claim]["spec"]["accessModes"] == ["ReadWriteMany"], \
                f"{where}/{group}: {SHARED_MOUNT} must be the ReadWriteMany PVC, got {volume}"
            env = mc.env_of(ray)
            for name in ("PEFT_SWEEPS_CACHE", "PEFT_SWEEPS_STORAGE"):
                assert env.get(name, {}).get("value", "").startswith(SHARED_MOUNT + "/"), f"{where}/{group}: {name}"
            assert env["PEFT_SWEEPS_CACHE"]["value"] == "/mnt/shared/model-cache"
            assert env.get("MLFLOW_TRACKING_URI", {}).get("value") == _mlflow_url(), f"{where}/{group}: MLflow URI"


def test_every_pod_runs_as_non_root_without_privilege_escalation() -> None:
    templates = [(f"{where} {name}", t) for where, d in DOCS for name, t in mc.pod_templates(d)]
    assert len(templates) >= 10
    for where, template in templates:
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True, f"{where}: must not run as root"
        for container in template["spec"]["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, f"{where}/{container['name']}"
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], f"{where}/{container['name']}"


def test_env_vars_the_manifests_set_are_read_by_the_code() -> None:
    names = {m for _, d in DOCS for _, v in mc.walk(d) if isinstance(v, str) for m in re.findall(r"PEFT_SWEEPS_\w+", v)}
    names |= set(re.findall(r"PEFT_SWEEPS_\w+", LAUNCHER.read_text()))
    source = "\n".join(p.read_text() for pkg in ("sweeps", "peft_engine") for p in (REPO / pkg).rglob("*.py"))
    assert names, "the manifests set no PEFT_SWEEPS_* variable"
    assert sorted(n for n in names if n not in source) == [], "set in cluster/ but read nowhere in sweeps/ or peft_engine/"


def test_entrypoints_name_existing_scripts_search_spaces_and_flags() -> None:
    invocations = [(f"{where}: {at}", args) for where, doc in DOCS for at, args in mc.run_py_invocations(doc)]
    invocations += mc.run_py_invocations(yaml.safe_load(LAUNCHER.read_text()))
    spaces = {args[args.index("--space") + 1] for _, args in invocations if "--space" in args}
    assert {"search_spaces/nightly.yaml", "search_spaces/gpu_llama8b_qlora.yaml"} <= spaces, spaces
    _ok(mc.entrypoint_errors(invocations))


def test_nightly_runs_are_scheduled_once_a_day_without_overlap() -> None:
    cron, ray_cron = _one("CronJob")["spec"], _one("RayCronJob")["spec"]
    assert mc.cron_errors(cron["schedule"]) == [] and mc.cron_errors(ray_cron["schedule"]) == []
    assert cron["concurrencyPolicy"] == "Forbid"
    job = cron["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    assert job["activeDeadlineSeconds"] < 86400
    # RayCronJob (KubeRay 1.6) has no concurrencyPolicy: a deadline shorter than the period is the guard.
    assert 0 < ray_cron["jobTemplate"]["activeDeadlineSeconds"] < 86400
    for where, args in mc.run_py_invocations(cron) + mc.run_py_invocations(ray_cron):
        assert args[:2] == ["--space", "search_spaces/nightly.yaml"], where
        assert {"--nightly", "--fail-on-regression"} <= set(args), where


def _nightly_script() -> tuple[str, dict]:
    container = _one("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/bash", "-c"]
    return container["args"][0], container


def test_nightly_cronjob_submits_to_the_raycluster_head_with_its_token() -> None:
    script, container = _nightly_script()
    line = next(ln for ln in script.splitlines() if ln.strip().startswith("ray job submit"))
    tokens = shlex.split(line)
    address = urlsplit(tokens[tokens.index("--address") + 1])
    cluster = _one("RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    dashboard_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "dashboard")
    assert (address.scheme, address.hostname, address.port) == ("http", f"{cluster['metadata']['name']}-head-svc",
                                                                dashboard_port)
    assert tokens[tokens.index("--working-dir") + 1] == "/app"
    assert tokens[tokens.index("--") + 1:tokens.index("--") + 3] == ["python", "sweeps/run.py"]
    env = mc.env_of(container)
    assert env["RAY_API_SERVER_ADDRESS"]["value"] == address.geturl()
    assert env["RAY_AUTH_MODE"]["value"] == mc.env_of(head)["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"] == mc.env_of(head)["RAY_AUTH_TOKEN"]["valueFrom"]


def test_nightly_cronjob_script_is_valid_bash() -> None:
    script, _ = _nightly_script()
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_secrets_are_placeholder_examples_and_every_reference_resolves() -> None:
    declared: dict[str, set[str]] = {}
    for where, doc in DOCS:
        if doc["kind"] != "Secret":
            continue
        assert where.split("#")[0].endswith(".example.yaml"), f"{where}: real Secrets must not live in the repo"
        assert "data" not in doc, f"{where}: use stringData placeholders, not base64 data"
        for key, value in doc["stringData"].items():
            if re.search(r"password|token|secret|access_key", key, re.IGNORECASE):
                assert "REPLACE_ME" in value, f"{where}: {key} must be a REPLACE_ME placeholder"
        declared[doc["metadata"]["name"]] = set(doc["stringData"])
    for where, doc in DOCS:
        for path, node in mc.walk(doc):
            if isinstance(node, dict) and "secretKeyRef" in node and not node["secretKeyRef"].get("optional"):
                ref = node["secretKeyRef"]
                assert ref["key"] in declared.get(ref["name"], set()), \
                    f"{where} {path}: Secret {ref['name']}/{ref['key']} is declared in no *.example.yaml"


def _images() -> list[tuple[str, str]]:
    found = [(w + p, v) for w, d in DOCS for p, v in mc.walk(d) if p.endswith(".image") and isinstance(v, str)]
    docker = yaml.safe_load(LAUNCHER.read_text()).get("docker", {})
    found += [(f"launcher docker.{k}", docker[k]) for k in ("image", "head_image", "worker_image") if k in docker]
    for dockerfile in (CLUSTER / "Dockerfile", CLUSTER / "mlflow" / "Dockerfile"):
        found += [(str(dockerfile), m) for m in re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), re.MULTILINE)]
    return found


def test_images_are_pinned_and_carry_the_release_versions() -> None:
    images = _images()
    assert len(images) > 10
    assert [e for _, ref in images for e in mc.image_errors(ref)] == []
    version = _pyproject()["project"]["version"]
    mlflow = mc.pinned_version(mc.dockerfile_pins(mc.read_dockerfile(CLUSTER / "Dockerfile")), "mlflow")
    for where, ref in images:
        name, tag = ref.rsplit(":", 1)
        if name.endswith("/peft-sweeps"):
            assert tag == version, f"{where}: {ref} should be tagged with the project version {version}"
        if name.endswith("/peft-sweeps-mlflow"):
            assert tag == mlflow, f"{where}: {ref} should be tagged with the mlflow pin {mlflow}"


def _lock(name: str) -> dict[str, str]:
    lines = (CLUSTER / "constraints" / name).read_text().splitlines()
    return dict(ln.split("==", 1) for ln in lines if ln and not ln.startswith("#"))


def test_dockerfile_pins_satisfy_pyproject_and_match_the_lock_files() -> None:
    pins = mc.dockerfile_pins(mc.read_dockerfile(CLUSTER / "Dockerfile"))
    _ok(mc.pin_errors(pins, _pyproject()["project"]["dependencies"]))
    assert "peft" not in pins, "peft is a test-only reference; the product never imports it"
    assert "+cpu" not in str(pins["torch"]) and "whl/cpu" not in (CLUSTER / "Dockerfile").read_text()
    mlflow_pins = mc.dockerfile_pins(mc.read_dockerfile(CLUSTER / "mlflow" / "Dockerfile"))
    assert mc.pinned_version(mlflow_pins, "mlflow") == mc.pinned_version(pins, "mlflow"), "server and clients must run one mlflow"
    for pinned, lock in ((pins, "sweeps-linux-x86_64-py312.txt"), (mlflow_pins, "mlflow-linux-x86_64-py312.txt")):
        locked = _lock(lock)
        assert {n: mc.pinned_version(pinned, n) for n in pinned} == {n: locked.get(n) for n in pinned}, \
            f"cluster/constraints/{lock} is stale: run bash cluster/lock.sh"


def test_dockerfiles_run_as_non_root_and_ship_the_repo() -> None:
    for path in (CLUSTER / "Dockerfile", CLUSTER / "mlflow" / "Dockerfile"):
        users = re.findall(r"^USER\s+(\S+)", path.read_text(), re.MULTILINE)
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{path}: last USER must be non-root"
    text = mc.read_dockerfile(CLUSTER / "Dockerfile")
    assert re.search(r"^COPY\s+(--chown=\S+\s+)?\.\s+/app$", text, re.MULTILINE), "the image must COPY the repo to /app"
    python = re.search(r"python3\.(\d+) -m venv", text)
    assert python and SpecifierSet(_pyproject()["project"]["requires-python"]).contains(f"3.{python[1]}")


def test_cluster_launcher_config_passes_rays_own_validation() -> None:
    _ok(mc.launcher_errors(yaml.safe_load(LAUNCHER.read_text())))


def test_mlflow_server_uses_postgres_and_a_proxied_object_store() -> None:
    deployment = next(d for d in _docs_of("Deployment") if d["metadata"]["name"] == "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args, env = container["args"], mc.env_of(container)
    assert args[0] == "server" and "--serve-artifacts" in args
    for flag in ("--artifacts-destination", "--backend-store-uri"):
        ref = re.fullmatch(r"\$\((\w+)\)", args[args.index(flag) + 1])
        assert ref and "secretKeyRef" in env[ref[1]]["valueFrom"], f"{flag} must come from a Secret"
    assert not any("sqlite" in a for a in args), "SQLite is for one machine only"
    for name, var in env.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|KEY|URI", name):
            assert "valueFrom" in var, f"{name} must come from a Secret, not a literal"
    db = next(d for d in _docs_of("Secret") if d["metadata"]["name"] == "mlflow-db")
    assert db["stringData"]["backend-store-uri"].startswith("postgresql://")
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert _mlflow_url().endswith(f":{port}")


# ---- every validator rejects a broken input -----------------------------------------------------------
def _broken(doc: dict, change) -> dict:
    doc = copy.deepcopy(doc)
    change(doc)
    return doc


def test_yaml_check_reports_unparseable_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: Service\nmetadata: {name: [unclosed\n")
    assert mc.yaml_errors([broken]) and not mc.yaml_errors([mc.LAUNCHER])


def test_kubernetes_schema_rejects_broken_core_objects() -> None:
    cron, pvc = _one("CronJob"), _docs_of("PersistentVolumeClaim")[0]
    assert mc.k8s_errors(_broken(cron, lambda d: d["spec"].update(concurrencyPolicy=3)))
    assert mc.k8s_errors(_broken(pvc, lambda d: d["spec"].update(accesModes=["ReadWriteMany"])))  # misspelt field
    ray_head = _one("RayCluster")["spec"]["headGroupSpec"]["template"]
    bad_env = _broken(ray_head, lambda t: t["spec"]["containers"][0]["env"].append({"name": "N", "value": 5}))
    assert mc.pod_template_errors(bad_env, "head")


_CLUSTER_BREAKS = {
    "no head": lambda d: d["spec"].pop("headGroupSpec"),
    "no groupName": lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"),
    "int rayStartParams": lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
    "min > max": lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2, replicas=3),
    "gpu request != limit": lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["requests"].update({"nvidia.com/gpu": 2}),
    "no image": lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("image"),
    "long name": lambda d: d["metadata"].update(name="x" * 54),
    "unknown field": lambda d: d["spec"].update(enableInTreeAutoscalling=True),
}
_JOB_BREAKS = {
    "no entrypoint": lambda d: d["spec"].pop("entrypoint"),
    "cluster and selector": lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "x"}),
    "ttl without shutdown": lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
    "runtime env not a mapping": lambda d: d["spec"].update(runtimeEnvYAML="- a list"),
}
_CRON_BREAKS = {
    "no schedule": lambda d: d["spec"].pop("schedule"),
    "bad schedule": lambda d: d["spec"].update(schedule="0 25 * * *"),
    "nested jobTemplate.spec": lambda d: d["spec"].update(jobTemplate={"spec": d["spec"]["jobTemplate"]}),
}


@pytest.mark.parametrize(("kind", "change"), [("RayCluster", c) for c in _CLUSTER_BREAKS.values()]
                         + [("RayJob", c) for c in _JOB_BREAKS.values()]
                         + [("RayCronJob", c) for c in _CRON_BREAKS.values()],
                         ids=[*_CLUSTER_BREAKS, *_JOB_BREAKS, *_CRON_BREAKS])
def test_kuberay_validation_rejects_broken_manifests(kind: str, change) -> None:
    assert mc.kuberay_errors(_broken(_one(kind), change))


def test_gpu_group_check_rejects_clusters_without_an_autoscaled_gpu_group() -> None:
    spec = _one("RayCluster")["spec"]
    no_gpu = _broken(spec, lambda s: [g["template"]["spec"]["containers"][0]["resources"]["limits"].pop(
        "nvidia.com/gpu", None) for g in s["workerGroupSpecs"]])
    assert mc.gpu_group_errors(no_gpu)
    assert mc.gpu_group_errors(_broken(spec, lambda s: s.update(enableInTreeAutoscaling=False)))


@pytest.mark.parametrize("expr", ["0 2 * * *", "*/15 * * * *", "0 0-6/2 1,15 JAN-MAR mon-fri", "30 3 ? * 7"])
def test_cron_check_accepts_standard_expressions(expr: str) -> None:
    assert mc.cron_errors(expr) == []


@pytest.mark.parametrize("expr", ["61 * * * *", "0 2 * *", "* * * * * *", "0 2 * * 8", "5-1 * * * *",
                                  "*/0 * * * *", "0 2 * FOO *", "CRON_TZ=UTC 0 2 * * *", 7])
def test_cron_check_rejects_invalid_expressions(expr: Any) -> None:
    assert mc.cron_errors(expr)


def test_image_check_rejects_floating_tags() -> None:
    assert mc.image_errors("ubuntu:latest") and mc.image_errors("registry:5000/team/img")
    assert not mc.image_errors("registry:5000/team/img:1.2.3") and not mc.image_errors("img@sha256:" + "0" * 64)


def test_pin_check_rejects_versions_outside_pyproject() -> None:
    pins = mc.dockerfile_pins('pip install "torch==2.13.0" "ray[tune]==2.60.0"')
    assert mc.pin_errors(pins, ["torch>=2.14"]) and mc.pin_errors(pins, ["ray[tune,train]>=2.50"])
    assert mc.pin_errors(pins, ["mlflow>=3"])  # not pinned at all
    _ok(mc.pin_errors(pins, ["torch>=2.4,<=2.13.0", "ray[tune]>=2.50,<3"]))


def test_entrypoint_check_reports_missing_spaces_and_unknown_flags(tmp_path: Path) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "run.py").write_text('parser.add_argument("--space")\n')
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "ok.yaml").write_text("{}\n")
    found = mc.run_py_invocations({"entrypoint": "python sweeps/run.py --space search_spaces/nope.yaml --bogus"})
    errors = mc.entrypoint_errors(found, tmp_path)
    assert any("nope.yaml does not exist" in e for e in errors) and any("--bogus" in e for e in errors)
    assert mc.entrypoint_errors(mc.run_py_invocations({"x": "python sweeps/run.py --space search_spaces/ok.yaml"}),
                             tmp_path) == []
    assert mc.entrypoint_errors(found, tmp_path / "empty") == ["sweeps/run.py does not exist, but the manifests run it"]


def test_launcher_check_rejects_broken_configs() -> None:
    config = yaml.safe_load(LAUNCHER.read_text())
    assert mc.launcher_errors(_broken(config, lambda c: c.pop("provider")))
    assert mc.launcher_errors(_broken(config, lambda c: c.update(head_node_type="ray.head.missing")))
    assert mc.launcher_errors(_broken(config, lambda c: c.update(worker_nodes={})))  # not in Ray's schema
    assert mc.launcher_errors(_broken(config, lambda c: c["docker"].update(image="rayproject/ray:latest")))
