"""The Ray cluster a sweep runs on: reach it (or start a local one), and check it can run every trial."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

from sweep.cli import UserError


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


def start_ray(address: str | None, dashboard_host: str) -> None:
    """Connect to ``address``, or start a Ray of our own on this machine, and print the dashboard URL."""
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    try:
        if address:
            ctx = ray.init(address=address, log_to_driver=True)
        else:
            ctx = ray.init(include_dashboard=dashboard_available(), dashboard_host=dashboard_host, log_to_driver=True)
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


def check_resources(planned, gpus_per_trial: float) -> None:
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
        if cfg.device == "cuda" and gpus_per_trial > max_gpus:
            raise UserError(f"--gpus-per-trial {gpus_per_trial} exceeds the {max_gpus:g} GPUs of the largest node")
        if cfg.cpus_per_trial > max_cpus:
            raise UserError(f"trial {cfg.name} needs {cfg.cpus_per_trial} CPUs; the largest node has {max_cpus:g}")


def trial_resources(gpus_per_trial: float):
    """Ray's per-trial resource request, read from the trial's own config."""
    def resources(config: dict) -> dict:
        t = config["trial"]["config"]
        return {"cpu": t["cpus_per_trial"], "gpu": gpus_per_trial if t["device"] == "cuda" else 0}

    return resources
