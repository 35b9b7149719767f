"""The Ray cluster a sweep runs on: reach it (or start a local one), and check it can run every trial."""

from __future__ import annotations

import importlib.util
import math
import os
import socket
from pathlib import Path

from sweep.cli import UserError
from trainers.config import CUDA_OVERHEAD_GB


def check_address(address: str | None) -> None:
    """Fail in seconds on an unreachable cluster instead of Ray's long connection retries."""
    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or hostport, int(port) if port.isdigit() else 6379), timeout=5).close()
    except (OSError, ValueError) as e:
        raise UserError(f"Ray address {address} is unreachable ({getattr(e, 'strerror', None) or e})") from None


def start_ray(address: str | None, dashboard_host: str, verbose: bool = False) -> None:
    """Connect to ``address``, or start a Ray of our own on this machine, and print the dashboard URL.
    Workers' output reaches the driver's console only with -v (``verbose``); trials write their own log
    files either way (``trainers/entry.py``)."""
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, the legacy engine prints nothing (the new one
    # still prints its start box and a TensorBoard hint); our console reports progress
    try:
        if address:
            ctx = ray.init(address=address, log_to_driver=verbose)
        else:
            ctx = ray.init(include_dashboard=dashboard_available(), dashboard_host=dashboard_host,
                           log_to_driver=verbose)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to Ray at {address}: {str(e).splitlines()[0]}") from None
    url = getattr(ctx, "dashboard_url", None)
    if url:
        token = Path.home() / ".ray" / "auth_token"
        auth = f"; it asks for the token in {token}" if token.exists() else ""
        print(f"Ray dashboard: http://{url}{auth}", flush=True)


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


def check_resources(planned, shares: dict[str, float]) -> None:
    """Refuse sweeps whose trials could never be scheduled, instead of leaving them pending forever."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    max_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    max_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    for p in planned:
        cfg = p.cfg
        if cfg.device == "cuda" and max_gpus == 0:
            raise UserError(f"trial {cfg.name} needs a CUDA GPU but the Ray cluster has none; run on a GPU machine, "
                            "pass --address of a GPU cluster, or --set device=cpu")
        if cfg.device == "cuda" and shares[cfg.name] > max_gpus:
            raise UserError(f"--gpus-per-trial {shares[cfg.name]:g} exceeds the {max_gpus:g} GPUs of the largest node")
        if cfg.cpus_per_trial > max_cpus:
            raise UserError(f"trial {cfg.name} needs {cfg.cpus_per_trial} CPUs; the largest node has {max_cpus:g}")


def trial_resources(shares: dict[str, float]):
    """Ray's per-trial resource request, read from the trial's own config."""
    def resources(config: dict) -> dict:
        t = config["trial"]
        cuda = t["config"]["device"] == "cuda"
        # a search's trials are named by Ray as they start: they carry their share in their config
        share = t.get("gpu_share") or shares.get(t.get("name"), max(shares.values(), default=1))
        return {"cpu": t["config"]["cpus_per_trial"], "gpu": share if cuda else 0}

    return resources
