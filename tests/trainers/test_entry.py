"""What a trial process leaves besides its results: its log file (all of its output, whatever wrote
it) and the system metrics that ride along with its step reports."""

import os
import subprocess
import sys
import time

from tests.conftest import REPO
from trainers.sysmetrics import SystemSampler

NOISY = """\
import logging, os, sys, warnings
from pathlib import Path
handler = logging.StreamHandler()  # made before the redirect: holds the original stderr, like library loggers
logging.getLogger("lib").addHandler(handler)
from trainers.entry import output_to
print("before", flush=True)
with output_to(Path(sys.argv[1])):
    print("print to stdout")
    warnings.warn("MatMul8bitLt: inputs will be cast", UserWarning)
    logging.getLogger("lib").warning("a library logger")
    os.write(2, b"C-level write to fd 2\\n")
print("after", flush=True)
"""


def test_output_to_catches_every_writer_and_gives_the_streams_back(tmp_path):
    log = tmp_path / "logs" / "t.log"
    proc = subprocess.run([sys.executable, "-c", NOISY, str(log)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("before\nafter\n", "")  # nothing of the trial reached the console
    text = log.read_text()
    for line in ("print to stdout", "UserWarning: MatMul8bitLt: inputs will be cast", "a library logger",
                 "C-level write to fd 2"):
        assert line in text, line


def test_system_sampler_reports_each_sample_once():
    sampler = SystemSampler([], interval=0.05).start()
    deadline = time.monotonic() + 20
    metrics = {}
    while not metrics and time.monotonic() < deadline:  # MLflow's monitors are imported in the thread first
        time.sleep(0.2)
        metrics = sampler.take()
    sampler.stop()
    sampler._thread.join(timeout=5)
    assert set(metrics) == {"cpu_utilization_percentage", "system_memory_usage_megabytes",
                            "system_memory_usage_percentage"}
    assert 0 <= metrics["cpu_utilization_percentage"] <= 100 and metrics["system_memory_usage_megabytes"] > 0
    sampler.take()  # what came in after the first take
    assert sampler.take() == {}  # stopped, nothing new: nothing is reported twice
