"""lora-sweep driver: search spaces, Ray Tune wiring, MLflow tracking, the summary table.

Space files import their vocabulary from here: ``from sweep import Space, Settings, Trial, grid`` (and, to
search, ``Search, Choice, IntRange, FloatRange, ASHA, MedianStopping, Budget``).
"""

from sweep.axes import ASHA, Budget, Choice, FloatRange, IntRange, MedianStopping, Search
from sweep.space import Settings, Space, SpaceError, Trial, TrialConfig, grid

__all__ = ["ASHA", "Budget", "Choice", "FloatRange", "IntRange", "MedianStopping", "Search", "Settings", "Space",
           "SpaceError", "Trial", "TrialConfig", "grid"]
