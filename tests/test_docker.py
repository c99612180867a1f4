"""The container and cluster files, checked without a Docker engine or a Kubernetes cluster.

Dockerfiles parse and install extras and pins that exist in pyproject; every `pairsift` command the
files run exists in the CLI with the options given; the RayJob uses KubeRay v1 field names with the
types KubeRay declares; the cluster-launcher config passes Ray's own validation.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import typer.main
import yaml
from packaging.requirements import Requirement

from pairsift.pipeline.cli import app
from pairsift.pipeline.config import parse_config

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


# --- Dockerfiles -----------------------------------------------------------------------------

def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, backslash continuations joined."""
    steps, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text, pending = pending + stripped, ""
        word, _, args = text.partition(" ")
        assert word.upper() == word and word in INSTRUCTIONS, f"{path.name}: unknown instruction {word!r}"
        steps.append((word, args.strip()))
    assert not pending, f"{path.name}: ends inside a continued line"
    return steps


def pip_installs(steps: list[tuple[str, str]]) -> list[list[str]]:
    """The package arguments of every `pip install` in RUN steps."""
    found = []
    for word, args in steps:
        if word != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            tokens = shlex.split(command)
            if tokens[:2] == ["pip", "install"] or tokens[1:3] == ["-m", "pip"]:
                packages, skip = [], False
                for token in tokens[tokens.index("install") + 1:]:
                    if skip:
                        skip = False
                    elif token in ("--index-url", "--extra-index-url", "-i", "-c", "-r", "--find-links", "-f"):
                        skip = True
                    elif not token.startswith("-"):
                        packages.append(token)
                found.append(packages)
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_parses_and_runs_pairsift(name):
    steps = parse_dockerfile(DOCKER / name)
    words = [w for w, _ in steps]
    assert words[0] in ("FROM", "ARG") and words.count("FROM") == 1
    assert all(w == "ARG" for w in words[: words.index("FROM")])
    (entrypoint,) = [json.loads(a) for w, a in steps if w == "ENTRYPOINT"]  # exec form: signals reach pairsift
    assert entrypoint == ["pairsift"]
    (cmd,) = [json.loads(a) for w, a in steps if w == "CMD"]
    assert_cli_accepts(entrypoint[1:] + cmd, f"{name} CMD")
    for word, args in steps:  # everything copied into the image exists in the build context
        if word == "COPY":
            *sources, _ = shlex.split(args)
            assert all((REPO / s).exists() for s in sources), f"{name}: COPY {sources}"
    ignore = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert ignore[ignore.index("*")] and "!pyproject.toml" in ignore  # the 6 GB venv never goes to the daemon


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_the_projects_extras_and_pins(name):
    installs = pip_installs(parse_dockerfile(DOCKER / name))
    extras_known = set(PYPROJECT["project"]["optional-dependencies"])
    pinned = {Requirement(r).name: Requirement(r).specifier for r in PYPROJECT["project"]["dependencies"]}
    project = [p for packages in installs for p in packages if p == "." or p.startswith(".[")]
    assert len(project) == 1, f"{name} installs the project once from its own pyproject"
    extras = set(re.fullmatch(r"\.(?:\[(.*)\])?", project[0]).group(1).split(","))
    assert extras <= extras_known, f"{name}: extras {extras - extras_known} are not in pyproject"
    assert "recaption" in extras and ("gpu" in extras) == name.endswith(".gpu")
    for packages in installs:
        for package in packages:
            if package.startswith("."):
                continue
            requirement = Requirement(package)
            if requirement.name in pinned:  # the image must not drift outside what pyproject allows
                versions = [spec.version for spec in requirement.specifier if spec.operator == "=="]
                if versions:
                    assert all(pinned[requirement.name].contains(v) for v in versions), f"{name}: {package}"
                else:
                    assert requirement.specifier == pinned[requirement.name], f"{name}: {package} vs pyproject"
    text = (DOCKER / name).read_text()
    assert "wordnet-base" in text and "rsync" in text


# --- the CLI ---------------------------------------------------------------------------------

def assert_cli_accepts(args: list[str], where: str) -> None:
    """`pairsift ARGS` names an existing (sub)command and only options that command has."""
    command = typer.main.get_command(app)  # typer's own click: a group is what has .commands
    args = list(args)
    while hasattr(command, "commands") and args and not args[0].startswith("-"):
        name = args.pop(0)
        assert name in command.commands, f"{where}: `pairsift {name}` is not a command ({sorted(command.commands)})"
        command = command.commands[name]
    options = {o for p in command.params for o in p.opts + p.secondary_opts} | {"--help"}
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"{where}: {command.name} has no option {arg} ({sorted(options)})"


def pairsift_invocations(text: str) -> list[list[str]]:
    """The arguments after each `pairsift` word (or a pairsift image in `docker run`, whose entrypoint
    is pairsift) in shell-like text, up to a shell operator."""
    found = []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, token in enumerate(tokens):
            if token == "pairsift" or re.fullmatch(r"\S+/pairsift(-gpu)?:[\w.]+", token) and "run" in tokens[:i]:
                rest = []
                for t in tokens[i + 1:]:
                    if t in ("&&", "||", ";", "|", "&") or t.startswith(("#", ">")):
                        break
                    rest.append(t)
                found.append(rest)
    return found


def test_readme_commands_exist_in_the_cli():
    text = (DOCKER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    invocations = [inv for block in blocks for inv in pairsift_invocations(block)]
    assert len(invocations) >= 3
    for args in invocations:
        assert_cli_accepts(args, "docker/README.md")


def test_the_cli_check_catches_a_wrong_command():
    with pytest.raises(AssertionError, match="not a command"):
        assert_cli_accepts(["curate", "demo"], "test")
    with pytest.raises(AssertionError, match="no option --adress"):
        assert_cli_accepts(["run", "demo", "--adress", "auto"], "test")
    assert_cli_accepts(["metadata", "build", "--out", "x.parquet"], "test")


# --- KubeRay RayJob --------------------------------------------------------------------------
# Field names and types of the ray.io/v1 API, from KubeRay's Go types
# (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go): json tag -> Python type.
STR_MAP = "map[string]string"
RAYJOB_SPEC = {
    "activeDeadlineSeconds": int, "backoffLimit": int, "rayClusterSpec": dict, "submitterPodTemplate": dict,
    "metadata": STR_MAP, "clusterSelector": STR_MAP, "submitterConfig": dict, "managedBy": str,
    "deletionPolicy": str, "entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "submissionMode": str,
    "entrypointResources": str, "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float),
    "ttlSecondsAfterFinished": int, "shutdownAfterJobFinishes": bool, "suspend": bool,
}
RAYCLUSTER_SPEC = {
    "suspend": bool, "managedBy": str, "autoscalerOptions": dict, "headServiceAnnotations": STR_MAP,
    "enableInTreeAutoscaling": bool, "gcsFaultToleranceOptions": dict, "headGroupSpec": dict, "rayVersion": str,
    "workerGroupSpecs": list,
}
HEAD_GROUP = {"template": dict, "headService": dict, "enableIngress": bool, "rayStartParams": STR_MAP,
              "serviceType": str}
WORKER_GROUP = {"suspend": bool, "groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int,
                "idleTimeoutSeconds": int, "rayStartParams": STR_MAP, "template": dict, "scaleStrategy": dict,
                "numOfHosts": int}


def check_fields(obj: dict, fields: dict, where: str, required: tuple[str, ...] = ()) -> None:
    assert isinstance(obj, dict), f"{where}: expected a mapping"
    for key in required:
        assert key in obj, f"{where}: {key} is required"
    for key, value in obj.items():
        assert key in fields, f"{where}.{key}: not a KubeRay v1 field"
        expected = fields[key]
        if expected == STR_MAP:  # e.g. rayStartParams: every value a string ("0", not 0)
            assert isinstance(value, dict) and all(isinstance(v, str) for v in value.values()), f"{where}.{key}"
        else:
            assert isinstance(value, expected) and not (expected is int and isinstance(value, bool)), f"{where}.{key}"


@pytest.fixture(scope="module")
def rayjob() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((DOCKER / "rayjob.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def pods(job: dict) -> dict[str, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    found = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    found |= {g["groupName"]: g["template"]["spec"] for g in cluster["workerGroupSpecs"]}
    found["submitter"] = job["spec"]["submitterPodTemplate"]["spec"]
    return found


def test_rayjob_uses_kuberay_v1_fields_with_their_types(rayjob):
    job = rayjob["RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and isinstance(job["metadata"]["name"], str)
    spec = job["spec"]
    check_fields(spec, RAYJOB_SPEC, "spec", required=("entrypoint", "rayClusterSpec"))
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode")
    cluster = spec["rayClusterSpec"]
    check_fields(cluster, RAYCLUSTER_SPEC, "rayClusterSpec", required=("headGroupSpec",))
    check_fields(cluster["headGroupSpec"], HEAD_GROUP, "headGroupSpec", required=("template", "rayStartParams"))
    assert cluster["workerGroupSpecs"]
    for i, group in enumerate(cluster["workerGroupSpecs"]):
        where = f"workerGroupSpecs[{i}]"
        check_fields(group, WORKER_GROUP, where, required=("groupName", "template", "rayStartParams"))
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
    names = [g["groupName"] for g in cluster["workerGroupSpecs"]]
    assert len(set(names)) == len(names)
    # the cluster runs the Ray the project pins
    assert Requirement(next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("ray"))).specifier \
        .contains(cluster["rayVersion"])


def test_rayjob_pods_run_the_image_with_its_config_and_one_auth_mode(rayjob):
    job, configmap = rayjob["RayJob"], rayjob["ConfigMap"]
    version = PYPROJECT["project"]["version"]
    modes = set()
    for name, pod in pods(job).items():
        container = pod["containers"][0]
        assert re.fullmatch(rf"[\w./-]+/pairsift(-gpu)?:{re.escape(version)}", container["image"]), name
        env = {e["name"]: e for e in container.get("env", [])}
        modes.add(env["RAY_AUTH_MODE"]["value"])
        assert "RAY_AUTH_TOKEN" in env, f"{name}: token auth needs the token on every process"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{name}: mounts undeclared volume {mount['name']}"
    assert modes == {"token"}  # RAY_AUTH_MODE must be the same on every process
    # the entrypoint is a pairsift command that exists, with the same auth mode as the pods
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[0] == "pairsift"
    assert_cli_accepts(args[1:], "rayjob entrypoint")
    overrides = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
    assert overrides["ray.auth_mode"] in modes
    # the config it names comes from the ConfigMap mounted at its directory, and is a valid pipeline config
    config_path = Path(args[2])
    head = pods(job)["head"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in {item["path"] for item in volume["configMap"]["items"]}
    cfg = parse_config(yaml.safe_load(configmap["data"][config_path.name]), source="rayjob ConfigMap")
    # every node writes parts into run_dir: it must be on the volume all pods mount
    shared = {m["mountPath"] for m in head["containers"][0]["volumeMounts"] if m["name"] != mount["name"]}
    assert any(cfg.run_dir.startswith(p + "/") for p in shared) and any(cfg.input.path.startswith(p + "/") for p in shared)
    for name, pod in pods(job).items():
        if name != "submitter":
            assert {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]} >= shared | {str(config_path.parent)}


# --- Ray cluster launcher --------------------------------------------------------------------

def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((DOCKER / "cluster.yaml").read_text())
    validate_config(config)  # Ray's JSON schema plus its head-node and worker-count checks
    assert {"cluster_name", "provider", "head_node_type", "available_node_types", "max_workers",
            "head_start_ray_commands", "worker_start_ray_commands"} <= set(config)
    assert config["provider"]["type"] in ("aws", "gcp", "azure")
    version = PYPROJECT["project"]["version"]
    assert config["docker"]["image"].endswith(f"/pairsift:{version}")
    options = " ".join(config["docker"]["run_options"])
    # the launcher runs `docker run ... IMAGE bash`: the image's `pairsift` entrypoint must be reset
    assert "--entrypoint=" in shlex.split(options)
    assert "RAY_AUTH_MODE=token" in options  # one auth mode for every Ray process on every node
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    with pytest.raises(Exception, match="head_node_type"):  # the validation is real: it rejects a bad config
        validate_config(config | {"head_node_type": "nope"})
