"""Every file in deploy/ is checked, offline: the cluster-launcher config against Ray's own schema
(and, with moto standing in for AWS, through the launcher's AWS bootstrap), the KubeRay RayJob
against the fields its CRD requires, and the README's commands against the CLIs and files they name.

No cloud, no Kubernetes: `ray up` has no dry run, and there is no API server here. What these
tests cannot see (an AMI that exists, a KubeRay operator's admission webhook) is noted in
deploy/README.md.
"""

from __future__ import annotations

import copy
import glob
import re
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List

import pytest
import ray
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.integration

DEPLOY = REPO / "deploy"
RAY_MAJOR_MINOR = ".".join(ray.__version__.split(".")[:2])


def load_cluster() -> Dict[str, Any]:
    return yaml.safe_load((DEPLOY / "cluster.yaml").read_text())


def load_rayjob_docs() -> List[Dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "rayjob.yaml").read_text()) if d is not None]


def the_rayjob() -> Dict[str, Any]:
    jobs = [d for d in load_rayjob_docs() if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


# --------------------------------------------------------------------------------------------
# deploy/ as a whole


CHECKED = {"cluster.yaml", "rayjob.yaml", "README.md"}


def test_every_file_in_deploy_is_checked():
    present = {p.name for p in DEPLOY.iterdir() if p.is_file()}
    assert present == CHECKED, f"deploy/ holds {sorted(present - CHECKED)} that no test here checks"


@pytest.mark.parametrize("name", sorted(n for n in CHECKED if n.endswith(".yaml")))
def test_yaml_parses(name):
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# --------------------------------------------------------------------------------------------
# deploy/cluster.yaml: Ray's cluster-config schema


def ray_validate(config: Dict[str, Any]) -> Dict[str, Any]:
    """What `ray up` does before it needs the cloud: defaults filled in, then Ray's schema and checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_validation():
    prepared = ray_validate(load_cluster())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _unknown_key(c):
    c["max_worker"] = 2  # a typo of max_workers


def _string_resources(c):
    c["available_node_types"]["cpu_worker"]["resources"] = {"CPU": "eight"}


def _missing_head_type(c):
    c["head_node_type"] = "no_such_type"


def _no_node_config(c):
    del c["available_node_types"]["cpu_worker"]["node_config"]


def _min_over_max(c):
    c["available_node_types"]["cpu_worker"]["min_workers"] = c["max_workers"] + 1


def _bad_docker_key(c):
    c["docker"]["imagee"] = c["docker"].pop("image")


@pytest.mark.parametrize("breaks", [_unknown_key, _string_resources, _missing_head_type, _no_node_config,
                                    _min_over_max, _bad_docker_key])
def test_a_broken_cluster_yaml_fails_rays_validation(breaks):
    import jsonschema

    config = load_cluster()
    breaks(config)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError, AssertionError)):
        ray_validate(config)


def test_cluster_yaml_keeps_token_auth_on_and_the_dashboard_on_loopback():
    c = load_cluster()
    head_start = " ".join(c["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in c[key] if "ray start" in cmd]
        assert starts, key
        for cmd in starts:
            before = cmd[:cmd.index("ray start")]
            assert "RAY_AUTH_MODE=token" in before, f"{key}: {cmd!r} starts Ray without token authentication"
    assert "0.0.0.0" not in head_start
    # The token reaches every node; interactive shells present it too.
    assert c["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    node_setups = [c["setup_commands"]] + [t["worker_setup_commands"] for t in c["available_node_types"].values()
                                           if "worker_setup_commands" in t]
    for commands in node_setups:
        assert any("export RAY_AUTH_MODE=token" in cmd for cmd in commands)


def test_cluster_yaml_installs_torch_then_the_project_with_the_tested_ray():
    c = load_cluster()
    node_setups = {"setup_commands": c["setup_commands"]}
    node_setups.update({name: t["worker_setup_commands"] for name, t in c["available_node_types"].items()
                        if "worker_setup_commands" in t})
    for where, commands in node_setups.items():
        torch_at = [i for i, cmd in enumerate(commands) if "pip install" in cmd and "torch==2.13.0" in cmd]
        sweep_at = [i for i, cmd in enumerate(commands) if "pip install" in cmd and "sweep-dist/sweep-" in cmd]
        assert torch_at and sweep_at and torch_at[0] < sweep_at[0], f"{where}: torch first, then the project"
    assert "download.pytorch.org/whl/cpu" in " ".join(c["setup_commands"]), "CPU nodes get the CPU build"
    images = [c["docker"]["image"]] + [t["docker"]["worker_image"] for t in c["available_node_types"].values()
                                       if "docker" in t]
    for image in images:
        assert image.startswith("rayproject/ray:"), image
        tag = image.split(":", 1)[1]
        assert tag.startswith(ray.__version__ + "-py311"), f"{image}: nodes need Ray {ray.__version__}, Python 3.11"


def test_cluster_yaml_mounts_exist_in_the_checkout():
    """Local sides of file_mounts are read from the repository root (where the README runs `ray up`)."""
    for remote, local in load_cluster()["file_mounts"].items():
        if local.startswith("~"):
            assert local == "~/.ray/auth_token", (remote, local)
            continue
        if local == "dist":  # built by `pip wheel --no-deps --wheel-dir dist .` before `ray up`
            assert "dist/" in (REPO / ".gitignore").read_text()
            continue
        assert (REPO / local).is_dir(), f"file_mounts {remote}: {local} is not a folder of the checkout"
    # The mounted example configs find their checkpoints at the same relative place.
    mounts = load_cluster()["file_mounts"]
    assert mounts["~/sweep/configs"] == "configs"
    assert mounts["~/sweep/sweep/examples/checkpoints"] == "sweep/examples/checkpoints"


def test_cluster_yaml_bootstraps_against_a_mocked_aws(tmp_path, monkeypatch):
    """The launcher's whole AWS bootstrap (IAM role, key pair, security group, subnets, instance-type
    resources) run against moto: what `ray up` resolves before it launches anything."""
    pytest.importorskip("moto")
    from moto import mock_aws

    import ray.autoscaler._private.aws.config as aws_config
    from ray.autoscaler._private.commands import _bootstrap_config

    monkeypatch.setenv("HOME", str(tmp_path))  # the generated key pair lands in ~/.ssh
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-west-2",
                        "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # Ray waits 15 s twice for IAM to propagate; moto needs no wait. Only that module's `time`.
    monkeypatch.setattr(aws_config, "time", SimpleNamespace(sleep=lambda seconds: None))
    try:
        with mock_aws():
            resolved = _bootstrap_config(load_cluster(), no_config_cache=True)
    finally:
        from ray.autoscaler._private.aws import utils as aws_utils

        for cached in ("resource_cache", "client_cache"):
            if hasattr(getattr(aws_utils, cached, None), "cache_clear"):
                getattr(aws_utils, cached).cache_clear()
    types = resolved["available_node_types"]
    assert types["head"]["resources"]["CPU"] == 0, "sweep's workers stay off the head"
    assert types["cpu_worker"]["resources"]["CPU"] == 8  # m5.2xlarge
    assert types["gpu_worker"]["resources"]["GPU"] == 1  # g5.xlarge
    for node_type in types.values():
        assert node_type["node_config"]["SecurityGroupIds"] and node_type["node_config"]["SubnetIds"]
    assert Path(resolved["auth"]["ssh_private_key"]).is_file()


# --------------------------------------------------------------------------------------------
# deploy/rayjob.yaml: the RayJob CRD (ray.io/v1, KubeRay v1.6)
#
# From KubeRay's ray-operator/apis/ray/v1/{rayjob,raycluster}_types.go: a field without
# `omitempty`/`+optional` is required by the generated CRD, and the API server drops unknown
# fields without a word, so a misspelt field would silently turn a setting off.

RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "historyServerOptions", "networkPolicy", "tlsOptions",
    "headGroupSpec", "rayVersion", "workerGroupSpecs",
}
RAYCLUSTER_REQUIRED = {"headGroupSpec"}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
                     "rayStartParams", "serviceType"}
HEAD_GROUP_REQUIRED = {"template"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                       "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
WORKER_GROUP_REQUIRED = {"groupName", "template"}  # minReplicas/maxReplicas are required with defaults (0, maxInt32)
AUTH_OPTIONS_FIELDS = {"mode", "secretName", "enableK8sTokenAuth"}
AUTH_MODES = {"disabled", "token"}
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def rayjob_problems(doc: Dict[str, Any]) -> List[str]:
    """What the API server (CRD schema) or the KubeRay operator would refuse or silently drop."""
    problems: List[str] = []

    def need(cond: bool, text: str) -> None:
        if not cond:
            problems.append(text)

    def only(obj: Dict[str, Any], allowed: set, where: str) -> None:
        for key in set(obj) - allowed:
            problems.append(f"{where}.{key}: not a field of the CRD (the API server would drop it)")

    need(doc.get("apiVersion") == "ray.io/v1", "apiVersion must be ray.io/v1")
    need(doc.get("kind") == "RayJob", "kind must be RayJob")
    name = (doc.get("metadata") or {}).get("name")
    need(isinstance(name, str) and bool(DNS_1123_SUBDOMAIN.match(name)), "metadata.name: a DNS-1123 name")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec is missing"]
    only(spec, RAYJOB_SPEC_FIELDS, "spec")
    need(isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip() != "", "spec.entrypoint")
    need(spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES, "spec.submissionMode")
    need(spec.get("shutdownAfterJobFinishes") is True, "spec.shutdownAfterJobFinishes: true")
    ttl = spec.get("ttlSecondsAfterFinished")
    need(isinstance(ttl, int) and ttl >= 0, "spec.ttlSecondsAfterFinished: an integer >= 0")
    if "runtimeEnvYAML" in spec:
        need(isinstance(spec["runtimeEnvYAML"], str) and isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict),
             "spec.runtimeEnvYAML: a YAML mapping as a string")

    cluster = spec.get("rayClusterSpec")
    if not isinstance(cluster, dict):
        return problems + ["spec.rayClusterSpec is missing (or use clusterSelector)"]
    only(cluster, RAYCLUSTER_SPEC_FIELDS, "spec.rayClusterSpec")
    for key in RAYCLUSTER_REQUIRED - set(cluster):
        problems.append(f"spec.rayClusterSpec.{key} is required")
    version = str(cluster.get("rayVersion", ""))
    need(".".join(version.split(".")[:2]) == RAY_MAJOR_MINOR,
         f"spec.rayClusterSpec.rayVersion {version!r} is not the installed Ray {ray.__version__}")
    auth = cluster.get("authOptions")
    if not isinstance(auth, dict):
        problems.append("spec.rayClusterSpec.authOptions is missing: token authentication off")
    else:
        only(auth, AUTH_OPTIONS_FIELDS, "spec.rayClusterSpec.authOptions")
        need(auth.get("mode") in AUTH_MODES, "authOptions.mode: disabled or token")
        need(auth.get("mode") == "token", "authOptions.mode must be token")

    def pod(template: Any, where: str) -> None:
        containers = ((template or {}).get("spec") or {}).get("containers")
        if not isinstance(containers, list) or not containers:
            problems.append(f"{where}.template.spec.containers: at least one container is required")
            return
        for i, c in enumerate(containers):
            need(isinstance(c.get("name"), str) and bool(c.get("name")), f"{where} container {i}: name is required")
            image = c.get("image", "")
            need(isinstance(image, str) and ":" in image, f"{where} container {i}: an image with a tag")
            if image.startswith("rayproject/ray:"):
                need(image.split(":", 1)[1].startswith(version),
                     f"{where} container {i}: image {image} is not Ray {version}")
            env = {e.get("name"): e.get("value") for e in c.get("env") or []}
            need(env.get("RAY_AUTH_MODE") == "token", f"{where} container {i}: RAY_AUTH_MODE=token")

    head = cluster.get("headGroupSpec")
    if isinstance(head, dict):
        only(head, HEAD_GROUP_FIELDS, "headGroupSpec")
        for key in HEAD_GROUP_REQUIRED - set(head):
            problems.append(f"headGroupSpec.{key} is required")
        need(isinstance(head.get("rayStartParams", {}), dict), "headGroupSpec.rayStartParams: a mapping")
        need(head.get("serviceType", "ClusterIP") == "ClusterIP", "headGroupSpec.serviceType: keep it ClusterIP")
        need(not head.get("enableIngress"), "headGroupSpec.enableIngress: no ingress to the dashboard")
        pod(head.get("template"), "headGroupSpec")
    groups = cluster.get("workerGroupSpecs")
    need(isinstance(groups, list) and len(groups) >= 1, "workerGroupSpecs: at least one worker group")
    for i, group in enumerate(groups or []):
        where = f"workerGroupSpecs[{i}]"
        only(group, WORKER_GROUP_FIELDS, where)
        for key in WORKER_GROUP_REQUIRED - set(group):
            problems.append(f"{where}.{key} is required")
        replicas, low, high = group.get("replicas"), group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        need(isinstance(replicas, int) and replicas >= 1, f"{where}.replicas: an integer >= 1")
        need(isinstance(low, int) and isinstance(high, int) and isinstance(replicas, int)
             and low <= replicas <= high, f"{where}: minReplicas <= replicas <= maxReplicas")
        need(isinstance(group.get("rayStartParams", {}), dict), f"{where}.rayStartParams: a mapping")
        pod(group.get("template"), where)
    return problems


def test_rayjob_has_what_the_crd_requires():
    assert rayjob_problems(the_rayjob()) == []


def _drop(path):
    def change(doc):
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[last]
    return change


def _set(path, value):
    def change(doc):
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    return change


BROKEN_RAYJOBS = {
    "old apiVersion": _set("apiVersion", "ray.io/v1alpha1"),
    "no entrypoint": _drop("spec.entrypoint"),
    "no headGroupSpec": _drop("spec.rayClusterSpec.headGroupSpec"),
    "no head template": _drop("spec.rayClusterSpec.headGroupSpec.template"),
    "no authOptions": _drop("spec.rayClusterSpec.authOptions"),
    "auth disabled": _set("spec.rayClusterSpec.authOptions.mode", "disabled"),
    "other rayVersion": _set("spec.rayClusterSpec.rayVersion", "2.9.0"),
    "misspelt field": _set("spec.shutdownAfterJobFinish", True),  # the API server would drop it
    "cluster kept": _set("spec.shutdownAfterJobFinishes", False),
    "no worker group": _set("spec.rayClusterSpec.workerGroupSpecs", []),
    "replicas above max": _set("spec.rayClusterSpec.workerGroupSpecs.0.replicas", 5),
    "no head container": _set("spec.rayClusterSpec.headGroupSpec.template.spec.containers", []),
    "no groupName": _drop("spec.rayClusterSpec.workerGroupSpecs.0.groupName"),
}


@pytest.mark.parametrize("breaks", list(BROKEN_RAYJOBS.values()), ids=list(BROKEN_RAYJOBS))
def test_a_broken_rayjob_is_caught(breaks):
    doc = copy.deepcopy(the_rayjob())
    breaks(doc)
    assert rayjob_problems(doc)


def test_rayjob_runs_the_quickstart_onto_the_pvc_with_the_token_secret():
    docs = load_rayjob_docs()
    job = the_rayjob()
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["sweep", "run", "configs/quickstart.yaml"]
    out = argv[argv.index("--out") + 1]
    assert Path(out).is_absolute(), "--out must not be the job's temporary working dir"
    assert (REPO / "configs" / "quickstart.yaml").is_file()

    # --out lies on a volume of the head backed by the PVC this file creates.
    head_pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head_pod["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in head_pod["volumes"]
              if "persistentVolumeClaim" in v}
    on = [name for name, path in mounts.items() if out == path or out.startswith(path.rstrip("/") + "/")]
    assert on and on[0] in claims, f"--out {out} is not on a PersistentVolumeClaim"
    pvcs = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    assert claims[on[0]] in pvcs
    env = {e["name"]: e.get("value") for e in head_pod["containers"][0]["env"]}
    mlflow = env.get("MLFLOW_TRACKING_URI", "")
    assert mlflow.startswith("sqlite:////" + mounts[on[0]].strip("/") + "/"), "the MLflow store is on the PVC too"

    # Token authentication from a Secret the README creates; the token is not in the file.
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "sweep-ray-token"}
    assert not any(d.get("kind") == "Secret" for d in docs)

    # The project is installed: torch (CPU build) and sweep, in the job's runtime environment.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    packages = runtime_env["pip"]["packages"]
    assert any(p.startswith("torch==2.13.0") for p in packages)
    assert any(p.replace(" ", "").startswith("sweep@") for p in packages)
    assert "working_dir" in runtime_env


# --------------------------------------------------------------------------------------------
# deploy/README.md: the commands name files that exist and flags the CLIs have

README = (DEPLOY / "README.md").read_text()
TOP_LEVEL = ("deploy", "configs", "sweep", "workers", "tests", "benchmarks")


def code_commands(text: str) -> List[str]:
    """Shell commands of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def segments(command: str) -> List[List[str]]:
    """argv of each simple command in a line (split at && ; | &), leading VAR=value dropped."""
    out = []
    for part in re.split(r"&&|;|\||(?<![<>])&(?!\d)", command):
        try:
            argv = shlex.split(part)
        except ValueError:
            continue
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def test_readme_mentions_only_files_that_exist():
    paths = set(re.findall(r"(?<![\w/~.:-])((?:%s)/[\w./*-]*[\w*])" % "|".join(TOP_LEVEL), README))
    assert "deploy/cluster.yaml" in paths and "deploy/rayjob.yaml" in paths
    missing = [p for p in sorted(paths) if not glob.glob(str(REPO / p))]
    assert not missing, f"deploy/README.md names files that do not exist: {missing}"


def _click_command(argv: List[str]):
    from ray.scripts.scripts import cli

    command, rest = cli, argv[1:]
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        command, rest = command.commands[rest[0]], rest[1:]
    return command, rest


def test_readme_ray_commands_exist_with_their_flags():
    checked = 0
    for command in code_commands(README):
        for argv in segments(command):
            if argv[0] != "ray":
                continue
            cmd, rest = _click_command(argv)
            assert not hasattr(cmd, "commands"), f"`{' '.join(argv)}`: no such ray command"
            known = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
            for arg in rest:
                if arg == "--":
                    break  # the job's entrypoint follows
                if arg.startswith("--"):
                    assert arg.split("=", 1)[0] in known, f"`{' '.join(argv)}`: ray has no option {arg}"
            checked += 1
    assert checked >= 12


def _sweep_argvs() -> List[List[str]]:
    argvs = []
    todo = [argv for command in code_commands(README) for argv in segments(command)]
    while todo:
        argv = todo.pop(0)
        if argv[:2] == ["ray", "exec"] and len(argv) > 3:  # ray exec CLUSTER 'COMMAND'
            todo.extend(segments(argv[3]))
            continue
        if "--" in argv and argv[0] == "ray":  # ray job submit ... -- sweep run ...
            argv = argv[argv.index("--") + 1:]
        if argv and argv[0] == "sweep":
            argvs.append(argv)
    return argvs


def test_readme_sweep_commands_parse_and_their_overrides_validate():
    from sweep.cli import _parser
    from sweep.config import load_config

    argvs = _sweep_argvs()
    assert len([a for a in argvs if a[1] == "run"]) >= 4
    for argv in argvs:
        args = _parser().parse_args(argv[1:])
        if args.command == "run":
            config = Path(str(args.config).replace("~/sweep/", str(REPO) + "/"))
            config = config if config.is_absolute() else REPO / config
            load_config(config, args.overrides)  # raises ConfigError on a bad --set


def test_readme_and_rayjob_use_the_same_names():
    job = the_rayjob()
    names = {job["metadata"]["name"], job["spec"]["rayClusterSpec"]["authOptions"]["secretName"]}
    names |= {d["metadata"]["name"] for d in load_rayjob_docs() if d.get("kind") == "PersistentVolumeClaim"}
    for name in names:
        assert name in README, f"{name} (deploy/rayjob.yaml) is not in deploy/README.md"
    assert f"create secret generic {job['spec']['rayClusterSpec']['authOptions']['secretName']}" in README
    assert "--from-literal=auth_token=" in README  # the key KubeRay reads
