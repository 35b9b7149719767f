"""The Ray cluster a sweep runs on: reach it (or start a local one), and check it can run every trial."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from sweep.cli import UserError
from trainers.config import CUDA_OVERHEAD_GB

LOOPBACK = "127.0.0.1"
CLUSTER_MODE_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
STORAGE_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def check_address(address: str | None) -> None:
    """Fail in seconds on an unreachable cluster instead of Ray's long connection retries."""
    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or hostport, int(port) if port.isdigit() else 6379), timeout=5).close()
    except (OSError, ValueError, OverflowError) as e:  # refused, unresolvable, or a port beyond 65535
        raise UserError(f"Ray address {address} is unreachable ({getattr(e, 'strerror', None) or e})") from None


def start_ray(address: str | None, dashboard_host: str, node_ip: str = LOOPBACK, verbose: bool = False) -> None:
    """Connect to ``address``, or start a private Ray on this machine, and print the dashboard URL.

    Without ``address`` the Ray is always a new one (``address="local"``): a plain ``ray.init()`` would
    attach to a cluster someone else started on this machine with ``ray start``. It is bound to
    127.0.0.1 (node IP, GCS, raylet, agents, workers), unless ``node_ip`` names this machine's address
    so that others can join it. The Ray processes get neither the tracking credentials nor, as the job's
    recorded entrypoint, a command line that still shows them. Workers' output reaches the driver's
    console only with -v (``verbose``); trials write their own log files either way (``trainers/entry.py``).
    """
    import ray

    from sweep.store import hidden_credentials, redact_argv

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, the legacy engine prints nothing (the new one
    # still prints its start box and a TensorBoard hint); our console reports progress
    storage_credentials_stay_on_nodes()
    argv, sys.argv = sys.argv, redact_argv(sys.argv)
    try:
        with hidden_credentials(), loopback_only(not address and node_ip == LOOPBACK):  # a cluster binds its own
            if address:
                ctx = ray.init(address=address, log_to_driver=verbose)
            else:
                ctx = ray.init(address="local", _node_ip_address=node_ip, include_dashboard=dashboard_available(),
                               dashboard_host=dashboard_host, log_to_driver=verbose)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to Ray at {address}: {str(e).splitlines()[0]}") from None
    finally:
        sys.argv = argv
    if threading.current_thread() is threading.main_thread():
        # Ray's core worker answers SIGTERM (timeout, kill, a scheduler preempting the job) with a C++ stack
        # dump on the console and an abrupt exit; take it as Ctrl-C instead: Tune stops the trials, the table
        # is written and the runs closed, and the same command resumes.
        signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    url = getattr(ctx, "dashboard_url", None)
    if url:
        token = Path.home() / ".ray" / "auth_token"
        auth = f"; it asks for the token in {token}" if token.exists() else ""
        print(f"Ray dashboard: http://{url}{auth}", flush=True)
    if not address and node_ip != LOOPBACK:
        print(f"Ray head: {ctx.address_info['gcs_address']} (other machines join with ray start --address)",
              flush=True)


def storage_credentials_stay_on_nodes() -> None:
    """Ray Tune 2.60 copies the driver's AWS_* credentials into every trial actor's runtime_env, which each
    node's runtime_env_agent.log then prints in full (measured: tests/sweep/test_s3_storage.py) and which
    would override the nodes' own. Trials take them from their node's environment instead: on this
    machine Ray's processes inherit the driver's at ray.init; on a cluster each node has its own."""
    with contextlib.suppress(ImportError):  # if Ray moves it, the S3 test's search for the secret says so
        from ray.tune.execution import class_cache

        class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - set(STORAGE_CREDENTIAL_VARS)


@contextlib.contextmanager
def loopback_only(on: bool):
    """Ray 2.60 binds its gRPC services to every interface unless the node's IP is 127.0.0.1, and resolves
    an explicit 127.0.0.1 to the machine's address unless its cluster mode is off (the mode Ray uses on
    macOS and Windows, read from this variable when Ray is imported, and by the processes ray.init starts).
    Measured with ss -ltnp: every listening socket of the sweep's Ray then is on 127.0.0.1."""
    if not on:
        yield
        return
    from ray._private import ray_constants

    from sweep.store import patched_env

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with patched_env({CLUSTER_MODE_VAR: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def dashboard_available() -> bool:
    """ray[tune] alone has no dashboard (ray[default] brings it); run the sweep anyway and say so."""
    if importlib.util.find_spec("aiohttp") and importlib.util.find_spec("opencensus"):
        return True
    print("Ray dashboard unavailable: install ray[default] for it", flush=True)
    return False


def gpu_memory_gb() -> float:
    """The smallest GPU memory (GiB) among the cluster's GPU nodes, read on each node by a tiny Ray task (inf
    when there is none)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_gpus=0.0001, num_cpus=0)
    def probe() -> float:
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout
            return min(float(x) for x in out.split()) / 1024
        except (OSError, ValueError, subprocess.SubprocessError):
            import torch

            return torch.cuda.get_device_properties(0).total_memory / 2**30

    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    if not nodes:  # nothing to size against; check_resources refuses the CUDA trials with the reason
        return math.inf
    tasks = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
             for node in nodes]
    try:
        return min(ray.get(tasks, timeout=120))
    except Exception as e:  # noqa: BLE001 - any failure means we cannot size trials from memory
        raise UserError(f"--gpus-per-trial auto: cannot read the GPUs' memory ({type(e).__name__}); "
                        "pass a number instead, e.g. --gpus-per-trial 1") from None


def gpu_shares(planned, gpus_per_trial: float | str) -> dict[str, float]:
    """Each CUDA trial's share of a GPU: the number given, or with ``auto`` its estimated peak memory
    (sweep/plan.py) over the GPU's, so small trials share a GPU and big ones get one; never more than fits."""
    cuda = [p for p in planned if p.cfg.device == "cuda"]
    if gpus_per_trial != "auto":
        return {p.cfg.name: float(gpus_per_trial) for p in cuda}
    if not cuda:
        return {}
    total = gpu_memory_gb()
    shares = {}
    for p in cuda:
        need = p.gpu_gb + CUDA_OVERHEAD_GB
        if need > total:
            raise UserError(f"trial {p.cfg.name} needs about {need:.0f} GiB of GPU memory but the GPUs have "
                            f"{total:.0f} GiB: set gradient_checkpointing=True (or fast_kbit=False, or a smaller "
                            "batch_size x grad_accum) in the space, or run on larger GPUs")
        shares[p.cfg.name] = math.ceil(need / total * 100) / 100
    return shares


def parse_resources(values: tuple[str, ...]) -> dict[str, float]:
    """--trial-resource NAME=AMOUNT values; Ray's own CPU/GPU/memory are set elsewhere."""
    out = {}
    for value in values:
        name, _, amount = value.partition("=")
        try:
            out[name] = float(amount)
        except ValueError:
            out[name] = math.nan
        if not name or name in ("CPU", "GPU", "memory", "object_store_memory") or not 0 < out[name] < math.inf:
            raise UserError(f"--trial-resource expects NAME=AMOUNT (a custom resource, amount > 0), got {value!r}")
    return out


def check_resources(planned, shares: dict[str, float], resources: dict[str, float] | None = None) -> None:
    """On a running cluster: refuse sweeps whose trials could never be scheduled, instead of leaving them
    pending forever."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for name, amount in (resources or {}).items():
        if not any(n.get(name, 0) >= amount for n in nodes):
            raise UserError(f"--trial-resource {name}={amount:g}: no node of the Ray cluster offers it "
                            f"(start nodes with ray start --resources='{{\"{name}\": N}}')")
    check_fits(planned, shares, max_cpus=max((n.get("CPU", 0) for n in nodes), default=0),
               max_gpus=max((n.get("GPU", 0) for n in nodes), default=0))


def check_local_resources(planned, gpus_per_trial: float | str) -> None:
    """The same check before a local Ray starts, against the CPUs and GPUs Ray will find on this machine
    (its own detection, so the answers agree); skipped if that detection is not available. With ``auto``
    the shares are sized after start-up (they need the GPUs' memory); an auto share is at most one GPU."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource
        from ray._private.utils import get_num_cpus

        gpu = get_accelerator_manager_for_resource("GPU")
        gpus = gpu.get_current_node_num_accelerators()
        visible = gpu.get_current_process_visible_accelerator_ids()
        if visible is not None:
            gpus = min(gpus, len(visible))
        cpus = get_num_cpus()
    except Exception:  # noqa: BLE001 - private Ray helpers: if they move, the check after start-up remains
        return
    check_fits(planned, {} if gpus_per_trial == "auto" else gpu_shares(planned, gpus_per_trial), max_cpus=cpus,
               max_gpus=gpus)


def check_fits(planned, shares: dict[str, float], *, max_cpus: float, max_gpus: float) -> None:
    for p in planned:
        cfg = p.cfg
        if cfg.device == "cuda" and max_gpus == 0:
            raise UserError(f"trial {cfg.name} needs a CUDA GPU but the Ray cluster has none; run on a GPU machine, "
                            "pass --address of a GPU cluster, or --set device=cpu")
        if cfg.device == "cuda" and shares.get(cfg.name, 0) > max_gpus:
            raise UserError(f"--gpus-per-trial {shares[cfg.name]:g} exceeds the {max_gpus:g} GPUs of the largest node")
        if cfg.cpus_per_trial > max_cpus:
            raise UserError(f"trial {cfg.name} needs {cfg.cpus_per_trial} CPUs; the largest node has {max_cpus:g}")


def trial_resources(shares: dict[str, float], custom: dict[str, float] | None = None):
    """Ray's per-trial resource request, read from the trial's own config, plus --trial-resource's."""
    def resources(config: dict) -> dict:
        t = config["trial"]
        cuda = t["config"]["device"] == "cuda"
        # a search's trials are named by Ray as they start: they carry their share in their config
        share = t.get("gpu_share") or shares.get(t.get("name"), max(shares.values(), default=1))
        return {"cpu": t["config"]["cpus_per_trial"], "gpu": share if cuda else 0,
                **({"custom_resources": dict(custom)} if custom else {})}

    return resources
