"""What the trial's machine does while it trains: CPU, memory and the trial's own GPUs, sampled in a
background thread by MLflow's own system-metrics monitors and handed to the driver in each report.

The driver logs them to the trial's MLflow run as ``system/<name>``, which is where MLflow's
"System metrics" charts and the compare view look. Why not MLflow's ``SystemMetricsMonitor`` itself:
it writes to the tracking store from this process, while every MLflow write of a sweep goes through
the driver (one writer, ``sweep/tracking.py``); and its NVML monitor reports every GPU of the node,
while a trial owns only the GPUs Ray gave it (matched here by UUID).
"""

from __future__ import annotations

import logging
import os
import threading

DEFAULT_INTERVAL = 5.0  # seconds; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it, as it does MLflow's


def sampling_interval() -> float:
    return float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or DEFAULT_INTERVAL)


def _monitors(gpu_uuids: list[str]) -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    monitors = [CPUMonitor()]
    if gpu_uuids:
        try:
            monitors.append(_own_gpus(gpu_uuids))
        except Exception as e:  # no NVML (driver or nvidia-ml-py missing): CPU metrics only
            logging.getLogger(__name__).warning("GPU metrics unavailable: %s", e)
    return monitors


def _own_gpus(gpu_uuids: list[str]):
    """MLflow's GPU monitor restricted to this trial's GPUs, numbered as the trial sees them (gpu_0 ...)."""
    import pynvml
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    monitor = GPUMonitor()
    by_uuid = {}
    for handle in monitor.gpu_handles:
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        by_uuid[(uuid.decode() if isinstance(uuid, bytes) else uuid).removeprefix("GPU-")] = handle
    monitor.gpu_handles = [by_uuid[u.removeprefix("GPU-")] for u in gpu_uuids if u.removeprefix("GPU-") in by_uuid]
    return monitor


class SystemSampler:
    """Samples every ``interval`` seconds until stopped; ``take()`` returns the mean of the samples since
    the previous ``take()`` (empty when there were none, so no value is ever reported twice)."""

    def __init__(self, gpu_uuids: list[str], interval: float | None = None):
        self.gpu_uuids, self.interval = gpu_uuids, interval or sampling_interval()
        self._samples: list[dict[str, float]] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="lora-sweep-system-metrics", daemon=True)

    def start(self) -> "SystemSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        monitors = _monitors(self.gpu_uuids)  # imported here: MLflow's import overlaps the model loading
        for m in monitors:  # psutil's first CPU reading is a meaningless 0.0: take and drop it
            m.collect_metrics()
            m.clear_metrics()
        while not self._stop.wait(self.interval):
            sample = {}
            for m in monitors:
                m.collect_metrics()
                sample.update(m.aggregate_metrics())
                m.clear_metrics()
            with self._lock:
                self._samples.append(sample)

    def take(self) -> dict[str, float]:
        with self._lock:
            samples, self._samples = self._samples, []
        keys = {k for s in samples for k in s}
        return {k: round(sum(s[k] for s in samples if k in s) / sum(k in s for s in samples), 2) for k in sorted(keys)}
