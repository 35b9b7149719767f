"""Plan a sweep before anything starts: resolve each trial's target modules on the model's own
architecture and count its exact parameters on the meta device (no weights, no GPU, seconds).

Every failure here names the space file, the trial and the field, and the CLI exits 2 on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from sweep.space import SpaceError, TrialConfig


@dataclass(frozen=True)
class PlannedTrial:
    cfg: TrialConfig
    trainable_params: int
    total_params: int


def _absolute(value: str) -> str:
    """Trials run with the trial directory as cwd, so local paths must not be relative."""
    return str(Path(value).resolve()) if Path(value).exists() else value


def plan(configs: list[TrialConfig], space_path, *, for_training: bool = True) -> list[PlannedTrial]:
    """Resolve and count every trial. ``for_training`` also checks that the data and weights can be
    had (a dry run needs neither: only configs, which are bundled for the post's model)."""
    from peft import get_peft_model

    from trainers.data import DataError, check_available
    from trainers.models import ModelError, check_weights_available, load_config, lora_config, meta_model, resolve_targets

    def fail(cfg: TrialConfig, field: str, e: Exception):
        raise SpaceError(f"{space_path}: trial {cfg.index} ({cfg.name}): field '{field}': {e}") from None

    model_configs, datasets_ok, out = {}, set(), []
    for cfg in configs:
        cfg = replace(cfg, model=_absolute(cfg.model), dataset=_absolute(cfg.dataset))
        if for_training and cfg.dataset not in datasets_ok:
            try:
                check_available(cfg.dataset)
            except DataError as e:
                fail(cfg, "dataset", e)
            datasets_ok.add(cfg.dataset)
        key = (cfg.model, cfg.trust_remote_code)
        if key not in model_configs:
            try:
                model_configs[key] = load_config(cfg.model, cfg.trust_remote_code)
                if for_training:
                    check_weights_available(cfg.model)
            except ModelError as e:
                fail(cfg, "model", e)
        model = meta_model(model_configs[key])
        try:
            cfg = replace(cfg, target_modules=resolve_targets(model, cfg.targets))
        except ModelError as e:
            fail(cfg, "targets", e)
        trainable, total = get_peft_model(model, lora_config(cfg)).get_nb_trainable_parameters()
        out.append(PlannedTrial(cfg, trainable, total))
    return out
