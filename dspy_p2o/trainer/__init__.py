"""GRPO with context distillation: advantages, losses, log-probs, the trainer, checkpoints."""

from dspy_p2o.checkpoints import latest_checkpoint
from dspy_p2o.config import TrainerConfig  # with the run's config (config.py), importable from here too
from dspy_p2o.trainer.advantages import Advantages, group_advantages
from dspy_p2o.trainer.grpo import GRPOTrainer, make_accelerator
from dspy_p2o.trainer.losses import aggregate, template_ratio_weights, token_loss, truncated_is_weights

__all__ = ["Advantages", "GRPOTrainer", "TrainerConfig", "aggregate", "group_advantages", "latest_checkpoint",
           "make_accelerator", "template_ratio_weights", "token_loss", "truncated_is_weights"]
