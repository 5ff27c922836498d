"""divo: offline RL with swappable generative behaviour models (DIVO, TD3+BC and ablations)."""

from divo.errors import CheckpointError, ConfigError, DatasetError, DivoError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DatasetError", "DivoError", "__version__"]
