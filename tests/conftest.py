"""Shared fixtures. Everything runs offline on the CPU with the bundled tiny model and data."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach for the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Materialized random: models for this test session only (every test: a refused sweep may have started
    writing its grid's random: base before its plan refused it)."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["LORA_SWEEP_CACHE"] = str(path)
    return path


def tiny_cfg(**overrides):
    """A TrialConfig on the tiny model and the bundled data, CPU; tests override what they exercise."""
    from trainers.config import TrialConfig

    values = dict(name="t", index=0, model="random:tiny-llama", dataset="bundled:products-400", device="cpu", r=8,
                  targets="attention", bits=16, target_modules=("q_proj", "v_proj"), learning_rate=3e-3, epochs=1,
                  batch_size=4, grad_accum=2, train_samples=100, logging_steps=1, lora_dropout=0.0,
                  max_new_tokens=4, heldout_prompts=0)
    return TrialConfig(**{**values, **overrides})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sweep.run", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_space(path: Path, settings: str = "", trials: str = 'Trial(r=8, targets="attention", bits=4)') -> Path:
    """A small valid space file on the tiny model; pieces replaced to make it invalid."""
    path.write_text(
        "from sweep import Settings, Space, Trial, grid\n"
        "space = Space(\n"
        "    name='t',\n"
        "    settings=Settings(model='random:tiny-llama', dataset='bundled:products-400', device='cpu'"
        f"{', ' + settings if settings else ''}),\n"
        f"    trials=[\n        {trials},\n    ],\n"
        ")\n"
    )
    return path


TINY_STEPS = 36  # optimizer steps of a trial in a tiny space: 144 train rows / batch 8 x 2 epochs


def write_tiny_space(path: Path, name: str, trials: str) -> Path:
    """A space of quick CPU trials (checkpoints every 6 steps, a loss logged every 3) for the cluster tests."""
    path.write_text(
        "from sweep import Settings, Space, Trial\n"
        f"space = Space(name={name!r}, trials=[{trials}], settings=Settings(\n"
        "    model='random:tiny-llama', dataset='bundled:products-400', device='cpu', cpus_per_trial=1,\n"
        "    learning_rate=3e-3, epochs=2, batch_size=8, train_samples=160, logging_steps=3, checkpoint_every=6,\n"
        "    max_new_tokens=8, heldout_prompts=1))\n")
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its hash: equal digests mean nothing was touched."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> dict[str, dict]:
    """summary.csv rows by trial_id, each a dict by column name."""
    import csv

    with open(path, newline="") as f:
        return {row["trial_id"]: row for row in csv.DictReader(f)}


def make_result(**values):
    """A TrialResult with plausible values for a finished CPU trial; tests override what they check."""
    from trainers.config import TrialResult

    defaults = dict(trainable_params=100, total_params=1000, trainable_pct=10.0, eval_loss=2.0, eval_loss_se=0.01,
                    response_loss=2.5, response_loss_se=0.01, perplexity=7.39, truncated_rows=0, truncated_pct=0.0,
                    response_tokens_lost=0, response_lost_pct=0.0, dropped_rows=0, rouge_l=0.2, rouge_l_se=0.05,
                    repeat_ngram_rate=0.1, end_marker_rate=0.5, gen_mean_words=40.0, setup_seconds=1.0,
                    train_seconds=1.0, eval_seconds=0.1, generate_seconds=0.1, train_tokens=100,
                    train_tokens_per_second=100.0, peak_gpu_mem_gb=0.0, train_loss_first=3.0, train_loss_last=2.0,
                    train_steps=10, train_examples=90, test_examples=10, bnb_layers=0, dataset_fingerprint="0" * 16,
                    bnb_layer_type="none", device_name="cpu", gpu_uuid="", resumed_from_step=0, train_started_at=0.0)
    return TrialResult(**{**defaults, **values})


def chromium():
    """Debian's headless Chromium through Selenium (``.ci/run`` installs both); the test is skipped, with
    the reason, only where they could not be installed."""
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed here (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,2200"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, errors included
    return webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))


def data_file(directory: Path, name: str, content: bytes) -> str:
    """A file with exactly these bytes (a dataset, a space file, a broken record); returns its path."""
    (directory / name).write_bytes(content)
    return str(directory / name)


@pytest.fixture()
def earlier_sweep(tmp_path) -> Path:
    """A sweep directory with results in it, as an earlier run leaves it."""
    import json

    out = tmp_path / "earlier"
    (out / "trials" / "r8-attention-4bit" / "adapter").mkdir(parents=True)
    (out / "trials" / "r8-attention-4bit" / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights")
    (out / "summary.csv").write_text("trial_id,status\nr8-attention-4bit,TERMINATED\n")
    (out / "sweep.json").write_text(json.dumps({"sweep_id": "abc", "name": "t", "space_fingerprint": "0" * 16,
                                                "mlflow_uri": "sqlite:///x.db"}))
    (out / "ledger.json").write_text("{}")
    return out


def one_line_error(err: str) -> str:
    """stderr of a refused command: exactly one line, ``error: ...``; returns it."""
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---- real services on 127.0.0.1 for the cluster tests: a two-node Ray, an MLflow server, an S3 endpoint ----
# Each is started by the test session and stopped by killing exactly the processes it started (never
# `ray stop`, which would take down other Ray clusters on the same machine).

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, proc=None, interval: float = 0.5):
    import time

    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(interval)
    return value


class Service:
    """A process we started in a session of its own, and everything it spawned (Ray daemonizes, but its
    processes stay in the session): stopped together, found by session id, so nothing else is touched."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.cmd, self.log = cmd, log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})

    def processes(self) -> list:
        import psutil

        def in_session(p) -> bool:
            try:
                return os.getsid(p.pid) == self.proc.pid
            except OSError:
                return False

        return [p for p in psutil.process_iter() if in_session(p)]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            p.kill()
        if self.proc.poll() is None:
            self.proc.wait(timeout=timeout)


def port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class RayCluster:
    """A Ray head plus worker nodes on this machine, each with its own temp dir; trials can be forced onto
    a worker through its custom resource ``worker``. Token auth as on a real cluster."""

    # Every node runs this checkout's code, as every node of a real cluster runs the same image.
    ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}

    def __init__(self, root: Path):
        self.root, self.workers = root, []
        for attempt in range(2):  # a loaded machine sometimes loses a dashboard module at start: once more
            self.port, self.dashboard_port = free_port(), free_port()
            self.head = Service(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                 f"--temp-dir={root / f'head{attempt}'}", "--num-cpus=1", "--num-gpus=0",
                                 *self.own_ports(), f"--ray-client-server-port={free_port()}"],
                                root / "head.log", self.ENV)
            try:
                wait_for(lambda: self.nodes(), 180, "ray head and its dashboard", interval=2)
                return
            except TimeoutError:
                self.head.stop(signal.SIGKILL)
            except BaseException:
                self.head.stop(signal.SIGKILL)
                raise
        raise TimeoutError(f"the Ray head did not start twice; see {root}/head.log")

    @staticmethod
    def own_ports() -> list[str]:
        """Ports that default to fixed numbers, which another Ray on this machine may hold."""
        return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_worker(self, cpus: int = 2, env: dict | None = None) -> Service:
        n, known = len(self.workers), {x["node_id"] for x in self.nodes()}
        worker = Service(["ray", "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
                          f"--temp-dir={self.root / f'worker{n}'}", f"--num-cpus={cpus}", "--num-gpus=0",
                          f'--resources={{"worker": {cpus}}}', *self.own_ports()], self.root / f"worker{n}.log",
                         {**self.ENV, **(env or {})})
        self.workers.append(worker)
        wait_for(lambda: self.worker_ids() - known, 180, "ray worker node", interval=1)
        return worker

    def nodes(self) -> list[dict]:
        """Ray's node table, read with the CLI so the test process never joins the cluster."""
        import json

        out = subprocess.run(["ray", "list", "nodes", f"--address={self.dashboard}", "--format=json", "--limit=100"],
                             capture_output=True, text=True, timeout=60, env={**os.environ, **self.ENV})
        try:
            return json.loads(out.stdout) if out.returncode == 0 else []
        except ValueError:  # "No resource in the cluster" while the head is still registering
            return []

    def worker_ids(self) -> set[str]:
        """The worker nodes (not the head) Ray counts as alive."""
        return {n["node_id"] for n in self.nodes() if n["state"] == "ALIVE" and not n["is_head_node"]}

    def stop(self) -> None:
        """SIGKILL: nothing of a test cluster needs a clean exit (SIGTERM cost ~30 s of Ray's teardown)."""
        for service in [*self.workers, self.head]:
            service.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster(request):
    """The module's two-node cluster; the worker node's environment is the module's ``WORKER_ENV`` (trials
    take theirs from the node that runs them: a fault injection for a named trial, say)."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        cluster = RayCluster(root)
        try:
            cluster.add_worker(env=getattr(request.module, "WORKER_ENV", None))
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def start_mlflow_server(root: Path, port: int | None = None) -> tuple[Service, str]:
    """``mlflow server`` on 127.0.0.1 with a SQLite store, artifacts served through it (no client touches
    its disk); returns the service and its URI once it answers /health."""
    import urllib.request

    port = port or free_port()
    service = Service(["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                       "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--serve-artifacts",
                       "--artifacts-destination", str(root / "artifacts")], root / f"mlflow-{port}.log")

    def healthy():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    wait_for(healthy, 120, "mlflow server", service.proc)
    return service, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server on 127.0.0.1 (the real S3 protocol over HTTP), with a bucket ``sweeps``;
    yields its endpoint URL. Test credentials only: moto accepts any."""
    import boto3

    root, port = tmp_path_factory.mktemp("s3"), free_port()
    service = Service([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], root / "moto.log")
    try:
        wait_for(lambda: port_open(port), 60, "moto s3 server", service.proc)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test").create_bucket(Bucket="sweeps")
        yield endpoint
    finally:
        service.stop(signal.SIGKILL)
