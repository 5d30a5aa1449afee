"""Training: recipes (``config``), the loop (``trainer``), checkpoints and distributed plumbing (paper Table 1)."""

from parameternet.train.config import TrainConfig, apply_overrides, load_config

__all__ = ["TrainConfig", "apply_overrides", "load_config"]
