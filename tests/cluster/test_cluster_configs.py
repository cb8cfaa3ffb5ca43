"""The cluster configs in cluster/configs/ stay valid: for `ray up`, for KubeRay, and for spear itself.

The checks are of behaviour, not of the values written in the files: each file loads through the
tool that reads it (spear's config loader and planner, Ray's `ray up` checks, KubeRay's CRD fields),
and the values that must agree do (GPUs per instance and per teacher, the Secret and ConfigMap the
manifests document creating and the ones they mount, the package extras the setup installs).

`ray up` runs ``prepare_config`` + ``validate_config`` (Ray's JSON schema and its own checks) before it
talks to AWS; the same two run here. KubeRay's CRDs are structural schemas: unknown fields are pruned
silently, so a misspelt field would simply vanish; the required fields and known field names below
are those of the ray.io/v1 CRDs (KubeRay master, 2026-08, ray-operator/config/crd/bases).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import ray
import yaml

from spear.cluster.jobs import CLI_MODULE
from spear.cluster.storage import CREDENTIAL_VARS
from spear.config import ConfigError, load_config
from spear.pipeline.cli import main as cli
from spear.pipeline.plan import make_plan
from spear.pipeline.submission import build_submission

CONFIGS = Path(__file__).resolve().parents[2] / "cluster" / "configs"
PYPROJECT = CONFIGS.parents[1] / "pyproject.toml"

# GPUs per instance of the types the configs use (AWS instance type specifications).
GPUS_PER_INSTANCE = {"g6e.xlarge": 1, "g6e.4xlarge": 1, "g6e.12xlarge": 4, "g6e.48xlarge": 8, "p4d.24xlarge": 8,
                     "p5.48xlarge": 8, "p5e.48xlarge": 8, "p5en.48xlarge": 8}

# ray.io/v1 CRD: required fields and the field names the schema knows.
RAYCLUSTER_SPEC_FIELDS = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                          "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy",
                          "networkPolicy", "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs"}
HEAD_GROUP_FIELDS = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
                     "serviceType", "template"}
WORKER_GROUP_FIELDS = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
                       "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
RAYJOB_SPEC_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
                      "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
                      "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
                      "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}


def _load(name: str):
    return yaml.safe_load((CONFIGS / name).read_text())


def _kind(name: str) -> str:
    """What reads the file: "ray up", a KubeRay kind ("RayCluster", "RayJob") or "spear" (spear's config loader)."""
    doc = _load(name)
    if isinstance(doc, dict) and "provider" in doc and "available_node_types" in doc:
        return "ray up"
    if isinstance(doc, dict) and doc.get("apiVersion") == "ray.io/v1":
        return doc["kind"]
    try:
        load_config(CONFIGS / name)
    except ConfigError as exc:
        raise AssertionError(f"{name}: neither a ray up config, a KubeRay manifest nor a valid spear config: {exc}")
    return "spear"


def _documented(name: str, pattern: str) -> list[re.Match]:
    """Matches of ``pattern`` in the comment lines of a file (the commands it tells the user to run)."""
    comments = " ".join(ln.lstrip("# ").rstrip() for ln in (CONFIGS / name).read_text().splitlines()
                        if ln.startswith("#")).replace("\\ ", " ")
    return list(re.finditer(pattern, comments))


def _spear_config_of(manifest_entrypoint: list[str]) -> tuple[str, Path]:
    """The /etc/spear/<file> argument of an entrypoint and the repository file it is made from."""
    (arg,) = [a for a in manifest_entrypoint if a.startswith("/etc/spear/")]
    return arg, CONFIGS / os.path.basename(arg)


def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


def _check_no_inline_credentials(text: str, where: str) -> None:
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{where}: an AWS access key id"
    for var in CREDENTIAL_VARS:
        assert not re.search(rf"{var}\s*[=:]\s*[\"']?[A-Za-z0-9/+]{{8,}}", text), f"{where}: {var} set inline"
        assert not re.search(rf"{var}\W+value\s*:", text), f"{where}: {var} set inline"


# --------------------------------------------------------------------------- every file


def test_every_file_is_read_by_a_known_tool_and_free_of_credentials():
    names = sorted(p.name for p in CONFIGS.iterdir() if p.suffix in (".yaml", ".yml"))
    kinds = {name: _kind(name) for name in names}
    # every kind the tests below check is there (a file of another kind fails in _kind)
    assert set(kinds.values()) == {"ray up", "RayCluster", "RayJob", "spear"}, kinds
    for name in names:
        _check_no_inline_credentials((CONFIGS / name).read_text(), name)


def test_spear_configs_validate_plan_on_gpus_and_hold_no_secrets():
    for name in [n.name for n in CONFIGS.glob("*.yaml") if _kind(n.name) == "spear"]:
        cfg = load_config(CONFIGS / name)
        # the cluster's nodes read and write object storage, not this machine's disk
        assert cfg.output.startswith("s3://") and all(s.uri.startswith("s3://") for s in cfg.corpus.sources), name
        assert cfg.storage.access_key_id is None and cfg.storage.secret_access_key is None, name
        domains = {s.domain for s in cfg.corpus.sources}
        assert "audio" not in domains or cfg.teachers.audio is not None, f"{name}: audio sources need an audio teacher"
        # The planner resolves every teacher (a known kind and size, the layer in range) and runs it on GPUs.
        plan = make_plan(cfg, hours=1000, speech_share=0.5, gpus=8).to_dict()
        teachers = cfg.teachers.configured()
        assert len(plan["teachers"]) == len(teachers), name
        for planned in plan["teachers"].values():
            assert planned["device"] == "gpu" and 1 <= planned["layer"] <= planned["layers"], (name, planned["name"])


# --------------------------------------------------------------------------- ray up (AWS)


def test_aws_cluster_config_passes_the_checks_of_ray_up():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load("aws-cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    prepared = prepare_config(raw)
    validate_config(prepared)  # raises on what `ray up` would reject
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    assert prepared["auth"]["ssh_user"]


def test_aws_node_types_match_the_instances_and_the_teachers():
    cfg = _load("aws-cluster.yaml")
    teachers = load_config(CONFIGS / "spear-tokenize.yaml").teachers
    need = max(t.num_gpus for t in teachers.configured())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    for name, t in workers.items():
        instance = t["node_config"]["InstanceType"]
        assert t["resources"].get("GPU", 0) == GPUS_PER_INSTANCE.get(instance, 0), f"{name}: GPU count of {instance}"
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: object storage through an instance profile"
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"]
    teacher_groups = [t for t in workers.values() if t["resources"].get("GPU", 0) >= need]
    # tokenize sizes its teacher pools from the GPUs present at job start: one GPU group must stay up
    assert any(t.get("min_workers", 0) >= 1 for t in teacher_groups)
    assert any(not t["resources"].get("GPU") and t["resources"].get("CPU", 0) >= 8 for t in workers.values())
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= cfg["max_workers"]


def test_aws_setup_installs_this_package_and_starts_ray_from_the_same_environment():
    cfg = _load("aws-cluster.yaml")
    (remote, local), = cfg["file_mounts"].items()
    assert local == "." and remote.startswith("/")  # the repository the command runs in, copied to every node
    setup = " ".join(cfg["setup_commands"])
    # Every install of this package installs the copied repository, with extras this package defines.
    installs = re.findall(r'pip install -q "([^"\[]+)(?:\[([\w,]+)\])?"', setup)
    ours = [(path, extras) for path, extras in installs if path == remote]
    assert ours, "the setup installs the copied repository"
    section = PYPROJECT.read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+) = ", section, re.M))  # (tomllib is Python 3.11+; the project supports 3.10)
    for _, named in ours:
        assert set(filter(None, named.split(","))) <= extras, f"extras {named} not all in pyproject"
    if any(t["resources"].get("GPU") for t in cfg["available_node_types"].values()):
        assert any("gpu" in named.split(",") for _, named in ours), "GPU nodes get the gpu extra (faiss on GPU)"
    venvs = set(re.findall(r"(~/[\w-]+)/bin/pip", setup))
    assert len(venvs) == 1
    (venv,) = venvs
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cfg[key])
        assert f"{venv}/bin/ray start" in start and "AWS_REGION=" in start
    assert "--head" in " ".join(cfg["head_start_ray_commands"]) and "--dashboard-host=0.0.0.0" in " ".join(cfg["head_start_ray_commands"])
    assert "$RAY_HEAD_IP" in " ".join(cfg["worker_start_ray_commands"])
    assert ".venv" in cfg["rsync_exclude"] and any(".git" in p for p in cfg["rsync_exclude"])


# --------------------------------------------------------------------------- KubeRay


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, f"{where}: unknown fields {set(spec) - RAYCLUSTER_SPEC_FIELDS}"
    assert "headGroupSpec" in spec and "template" in spec["headGroupSpec"]
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert spec["rayVersion"] == ray.__version__, "rayVersion must match the Ray of the image"
    for g in spec["workerGroupSpecs"]:
        assert WORKER_GROUP_REQUIRED <= set(g) <= WORKER_GROUP_FIELDS, f"{where}/{g.get('groupName')}"
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    for group in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
        # rayStartParams is map[string]string in the CRD: a bare number is rejected by the API server
        assert all(isinstance(v, str) for v in (group.get("rayStartParams") or {}).values())
    head_params = spec["headGroupSpec"].get("rayStartParams") or {}
    assert head_params.get("num-cpus") == "0", "no tasks on the head"
    head_ports = {p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= head_ports

    for name, pod in _pod_specs(spec):
        ray_container = pod["containers"][0]
        assert ray_container["name"] and ray_container["image"], f"{where}/{name}"
        res = ray_container["resources"]
        assert res["requests"] == res["limits"], f"{where}/{name}: Ray reads limits; requests equal them"
        env = {e["name"]: e for e in ray_container["env"]}
        for e in ray_container["env"]:
            if e["name"] in CREDENTIAL_VARS:
                assert "value" not in e, f"{where}/{name}: {e['name']} inline; it belongs in the Secret"
        assert env["AWS_REGION"].get("value"), f"{where}/{name}: object-store region"
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert "value" not in env[var] and ref["name"] and ref["key"], f"{where}/{name}: {var}"
        assert pod.get("serviceAccountName"), f"{where}/{name}: IAM role through the service account"


def _check_secret_is_the_documented_one(spec: dict, manifest: str) -> None:
    """Every pod reads its credentials from the Secret the manifest tells the user to create, by keys it is given
    (a key not given must be optional, or the pod would not start)."""
    (created,) = _documented(manifest, r"kubectl create secret generic (\S+)((?:\s+--from-literal=[\w-]+=\S+)+)")
    name, given = created.group(1), set(re.findall(r"--from-literal=([\w-]+)=", created.group(2)))
    for pod_name, pod in _pod_specs(spec):
        for e in pod["containers"][0]["env"]:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                continue
            assert ref["name"] == name, f"{manifest}/{pod_name}: {e['name']} reads Secret {ref['name']}, not {name}"
            assert ref["key"] in given or ref.get("optional"), f"{manifest}/{pod_name}: {e['name']} key {ref['key']}"


def _gpu_groups(spec: dict) -> dict[str, tuple[dict, int]]:
    out = {}
    for g in spec["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            out[g["groupName"]] = (g, int(limits["nvidia.com/gpu"]))
    return out


def _check_gpu_groups(spec: dict, where: str) -> None:
    teachers = load_config(CONFIGS / "spear-tokenize.yaml").teachers
    need = max(t.num_gpus for t in teachers.configured())
    gpu = _gpu_groups(spec)
    assert "gpu-teachers" in gpu, f"{where}: a GPU group for the teachers"
    group, n = gpu["gpu-teachers"]
    assert n >= need and group["minReplicas"] >= 1
    for name, (g, n) in gpu.items():
        pod = g["template"]["spec"]
        instance = (pod.get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")
        if instance:
            assert GPUS_PER_INSTANCE[instance] >= n, f"{where}/{name}: {instance} has fewer GPUs"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{where}/{name}"
    assert any("nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"]["limits"]
               for g in spec["workerGroupSpecs"]), f"{where}: a CPU group for decoding"


def test_kuberay_raycluster_has_the_fields_kuberay_requires():
    doc = _load("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"], "RayCluster")
    _check_gpu_groups(doc["spec"], "RayCluster")
    _check_secret_is_the_documented_one(doc["spec"], "kuberay-raycluster.yaml")
    # groups that may grow or shrink do so only through the in-tree autoscaler
    if any(g["minReplicas"] < g["maxReplicas"] for g in doc["spec"]["workerGroupSpecs"]):
        assert doc["spec"].get("enableInTreeAutoscaling") is True


def test_kuberay_rayjob_has_the_fields_kuberay_requires_and_a_working_entrypoint(tmp_path):
    from ray.runtime_env import RuntimeEnv

    doc = _load("kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, f"unknown fields {set(spec) - RAYJOB_SPEC_FIELDS}"
    # the manifest promises the cluster goes when the job ends: KubeRay does that only with shutdownAfterJobFinishes
    assert _documented("kuberay-rayjob.yaml", r"deletes the cluster when the job has finished")
    assert spec["shutdownAfterJobFinishes"] is True and spec.get("ttlSecondsAfterFinished", 0) >= 0
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    _check_gpu_groups(spec["rayClusterSpec"], "RayJob")
    _check_secret_is_the_documented_one(spec["rayClusterSpec"], "kuberay-rayjob.yaml")
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))  # Ray's own validation of the runtime_env fields
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never" and submitter["containers"][0]["image"]
    assert "command" not in submitter["containers"][0], "KubeRay supplies the `ray job submit` command"

    # The entrypoint parses with the real CLI and already asks for the JSON summary.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", CLI_MODULE]  # what `spear submit` runs too
    sub = build_submission(argv, env={}, cli=cli)
    assert sub.args == argv[3:] and not sub.uploads

    # Its config comes from the ConfigMap mounted on the head, made from a file of this folder that validates.
    arg, source = _spear_config_of(argv)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = [m for m in head["containers"][0]["volumeMounts"] if arg.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mount) == 1
    (volume,) = [v for v in head["volumes"] if v["name"] == mount[0]["name"]]
    assert source.is_file()
    load_config(source)
    # the documented `kubectl create configmap NAME --from-file=<that file>` makes the ConfigMap mounted, with this key
    made = {(m.group(1), m.group(2)) for m in _documented("kuberay-rayjob.yaml",
                                                           r"kubectl create configmap (\S+) --from-file=cluster/configs/(\S+)")}
    assert (volume["configMap"]["name"], source.name) in made


def test_kuberay_entrypoint_shown_in_the_raycluster_notes_parses():
    """The submit line documented at the top of the RayCluster manifest is a valid spear command."""
    text = (CONFIGS / "kuberay-raycluster.yaml").read_text()
    lines = [ln.lstrip("# ").rstrip() for ln in text.splitlines() if ln.startswith("#")]
    joined = " ".join(lines).replace("\\ ", " ")
    m = re.search(r"(spear submit .*? -- +spear tokenize [^ ]+)", joined)
    assert m, "the manifest documents how to submit"
    argv = shlex.split(m.group(1))
    inner = argv[argv.index("--") + 1:]
    sub = build_submission(inner, env={}, cli=cli)
    assert sub.args[0] == "tokenize" and "--json" in sub.args
    mounted = _load("kuberay-raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(inner[-1].startswith(m["mountPath"]) for m in mounted["volumeMounts"])
