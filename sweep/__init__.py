"""lora-sweep driver: search spaces, Ray Tune wiring, MLflow tracking, the summary table.

Space files import their vocabulary from here: ``from sweep import Space, Settings, Trial, grid``.
"""

from sweep.space import Settings, Space, SpaceError, Trial, TrialConfig, grid

__all__ = ["Settings", "Space", "SpaceError", "Trial", "TrialConfig", "grid"]
