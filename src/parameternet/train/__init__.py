"""Training: recipes (``recipe``, ``config``, ``lm_config``), one run loop (``loop``) driving the image
(``trainer``) and language-model (``lm``) tasks, checkpoints and distributed plumbing (paper Table 1)."""

from parameternet.train.config import TrainConfig, apply_overrides, load_config

__all__ = ["TrainConfig", "apply_overrides", "load_config"]
