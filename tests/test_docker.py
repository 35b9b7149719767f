"""docker/: what can be checked without a Docker engine (none runs on CI): the compose file parses and
references only files that exist, the image installs the project as the README does with the tested
versions, and the KubeRay manifest has the fields KubeRay requires. Images are never built or pulled here."""

import re
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import REPO

DOCKER = REPO / "docker"
RAY_NODES = ("ray-head", "ray-worker", "submit")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfile_lines(name: str) -> list[str]:
    """Instructions with their continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / name).read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def readme_install() -> list[str]:
    """The commands of the README's "Set up" section."""
    section = (REPO / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [ln.strip() for ln in section.splitlines() if ln.startswith("    ") and ln.strip()]


def pins() -> dict[str, str]:
    lines = (DOCKER / "constraints.txt").read_text().splitlines()
    return dict(ln.split("==") for ln in lines if ln.strip() and not ln.startswith("#"))


def test_compose_references_only_files_that_exist(compose):
    for name, svc in compose["services"].items():
        assert "image" in svc, f"{name}: every service names its image (built ones are tagged)"
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).is_file(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
        for dep in svc.get("depends_on", {}):
            assert dep in compose["services"], f"{name} depends on unknown service {dep}"
    copied = [ln.split()[-2] for ln in dockerfile_lines("Dockerfile") if ln.startswith("COPY")]
    assert copied and all((REPO / src).exists() for src in copied), copied


def test_compose_publishes_on_loopback_and_keeps_secrets_out(compose):
    published = {n: s["ports"] for n, s in compose["services"].items() if "ports" in s}
    assert set(published) == {"ray-head", "mlflow", "prometheus", "grafana"}
    for name, ports in published.items():
        assert all(p.startswith("127.0.0.1:") for p in ports), f"{name} publishes beyond loopback: {ports}"
    assert "127.0.0.1:8265:8265" in published["ray-head"]  # the dashboard, which can run arbitrary jobs
    text = (DOCKER / "compose.yaml").read_text()
    for secret in ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        assert f"${{{secret}:?" in text, f"{secret} must come from docker/.env, required"
    for name in RAY_NODES:
        env = compose["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name


def test_compose_wires_mlflow_metrics_and_workers(compose):
    svc = compose["services"]
    mlflow = svc["mlflow"]["command"]
    assert "--serve-artifacts" in mlflow and "postgresql://mlflow:${POSTGRES_PASSWORD}@postgres:5432/" in mlflow
    assert "mlflow:5000" in mlflow.split("--allowed-hosts", 1)[1]  # the name the nodes use
    for name in RAY_NODES:
        assert svc[name]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert svc["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--num-gpus=0" in svc["ray-head"]["command"] and "--address=" in svc["ray-worker"]["command"]
    # Prometheus reads the service-discovery file the head writes into its temp dir; Grafana its dashboards
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (sd,) = prom["scrape_configs"][0]["file_sd_configs"][0]["files"]
    head_tmp = next(v for v in svc["ray-head"]["volumes"] if v.endswith(":/tmp/ray"))
    assert sd.startswith("/tmp/ray/") and head_tmp + ":ro" in svc["prometheus"]["volumes"]
    assert head_tmp + ":ro" in svc["grafana"]["volumes"]
    assert svc["grafana"]["environment"]["GF_PATHS_PROVISIONING"].startswith("/tmp/ray/session_latest/")
    head_env = svc["ray-head"]["environment"]
    assert (head_env["RAY_PROMETHEUS_HOST"], head_env["RAY_GRAFANA_HOST"]) == (
        "http://prometheus:9090", "http://grafana:3000")
    assert "--metrics-export-port=8080" in svc["ray-head"]["command"]
    assert "--metrics-export-port=8080" in svc["ray-worker"]["command"]
    assert svc["submit"]["profiles"] == ["sweep"] and svc["submit"]["command"].startswith("ray job submit ")


def test_dockerfile_installs_as_the_readme_does_as_a_user():
    lines = dockerfile_lines("Dockerfile")
    assert re.fullmatch(r"FROM nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", lines[0]), lines[0]
    cpu_torch, install = readme_install()  # on a GPU machine the README skips the CPU torch line
    assert cpu_torch == "pip install torch==2.13.0" and install == 'pip install -e ".[dev]"'
    runs = [ln.removeprefix("RUN ") for ln in lines if ln.startswith("RUN pip install")]
    assert runs == [install]
    assert "PIP_CONSTRAINT=/app/docker/constraints.txt" in next(ln for ln in lines if "PIP_CONSTRAINT" in ln)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert lines.index(f"USER {users[0]}") < lines.index(f"RUN {install}")  # installed as the user, too


def test_image_pins_every_dependency_inside_pyproject_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pinned = pins()
    assert sorted(pinned) == sorted(r.name for r in wanted)
    for req in wanted:
        assert req.specifier.contains(pinned[req.name]), f"{req.name}=={pinned[req.name]} is outside {req}"
    mlflow_image = " ".join(dockerfile_lines("mlflow.Dockerfile"))
    assert f"mlflow=={pinned['mlflow']} " in mlflow_image  # the server speaks the client's version


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((DOCKER / "kuberay" / "rayjob.yaml").read_text())


def test_rayjob_has_what_kuberay_requires(rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"])
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("python -m sweep.run ") and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pins()["ray"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        assert pod["containers"] and all(c["name"] and c["image"] for c in pod["containers"])
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:  # credentials come from a Secret, never inline
            assert all("valueFrom" in e for e in c.get("env", []) if re.search("KEY|URI|TOKEN", e["name"]))
    groups = cluster["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
    claim = yaml.safe_load((DOCKER / "kuberay" / "pvc.yaml").read_text())
    volumes = cluster["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes} == {claim["metadata"]["name"]}


def sweep_argv(command: str) -> list[str]:
    """The ``python -m sweep.run`` arguments of a command line, compose's ${VAR:-default} at their defaults."""
    import shlex

    command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command)
    words = shlex.split(command)
    return words[words.index("sweep.run") + 1:]


def test_the_sweep_commands_in_compose_and_the_rayjob_are_valid_for_our_cli(compose, rayjob):
    from sweep.run import options, parse_args

    for command in (compose["services"]["submit"]["command"], rayjob["spec"]["entrypoint"]):
        argv = sweep_argv(command)
        opts = options(parse_args(argv))  # the real parser: an option renamed here fails this test
        assert opts.address == "auto" and opts.storage and opts.output, command
        assert (REPO / opts.space.removeprefix("/app/")).is_file(), opts.space  # /app is the image's checkout
    assert options(parse_args(sweep_argv(compose["services"]["submit"]["command"]))).mlflow_uri == "http://mlflow:5000"
