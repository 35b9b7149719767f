"""Fault injection for the fault tests: off unless LORA_SWEEP_FAULTS is set.

LORA_SWEEP_FAULTS is JSON: trial name -> {step, mode, marker?, sleep?}. Mode ``raise`` raises at
``step``; ``kill`` SIGKILLs this worker process at ``step``; ``slow`` sleeps ``sleep`` seconds every
step (so a test can interrupt mid-training); ``wait`` creates ``<marker>.reached`` at ``step`` and
waits (up to ten minutes) until ``marker`` exists, so a test can act while the sweep is held at a
known point; ``oom`` asks the caching allocator for the whole GPU at ``step``, beyond any packed
trial's cap, as a trial that outgrows its share does (torch.OutOfMemoryError); on the CPU, which has
no cap to hit, it raises the error PyTorch raises for a capped process (a stand-in of CUDA's message).
With ``log``, a fault appends a line to that file each time it fires. Otherwise, with ``marker``, the
fault fires only while that file does not exist, and creates it: once, as Ray Tune's own fault tests do.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

ENV = "LORA_SWEEP_FAULTS"
# PyTorch's message for a process capped at 2 GiB that asked for 4 more (an H200's, with these sizes)
CPU_OOM = ("CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
           "137.99 GiB is free. Including non-PyTorch memory, this process has 830.00 MiB memory in use. 2.00 GiB "
           "allowed; Of the allocated memory 64.58 MiB is allocated by PyTorch, and 7.42 MiB is reserved by PyTorch "
           "but unallocated.")


class FaultInjector(TrainerCallback):
    def __init__(self, spec: dict):
        self.spec = spec

    def on_step_end(self, args, state, control, **kwargs):
        s = self.spec
        if s["mode"] == "slow":
            time.sleep(s.get("sleep", 0.2))
            return
        if state.global_step != s["step"]:
            return
        marker = s.get("marker")
        if s["mode"] == "wait":
            Path(marker + ".reached").write_text(str(os.getpid()))
            deadline = time.monotonic() + 600
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.1)
            return
        if marker:
            if os.path.exists(marker):
                return
            Path(marker).write_text(str(os.getpid()))
        if s.get("log"):
            with open(s["log"], "a") as f:
                f.write(f"{s['mode']} at step {state.global_step}\n")
        if s["mode"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if s["mode"] == "oom":
            import torch

            if torch.cuda.is_available():
                torch.empty(torch.cuda.get_device_properties(0).total_memory, dtype=torch.uint8, device="cuda")
            raise torch.OutOfMemoryError(CPU_OOM)
        raise RuntimeError(f"injected fault at step {state.global_step}")


def injectors(trial_name: str) -> list[TrainerCallback]:
    """The fault planned for this trial, if a test asked for one."""
    spec = json.loads(os.environ.get(ENV, "{}")).get(trial_name)
    return [FaultInjector(spec)] if spec else []
