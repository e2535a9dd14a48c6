"""TRL's GRPOTrainer with its generation and training-step wall times recorded (shared by the benchmarks).

Run from a script in benchmarks/ (its folder is on sys.path): `from trl_timing import timed_grpo_trainer`.
"""

from __future__ import annotations

import time


def timed_grpo_trainer(generation_times: list[float], step_times: list[float]) -> type:
    """A `trl.GRPOTrainer` subclass appending each generate-and-score call's and each
    `training_step`'s seconds to the given lists (a step includes its generation)."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                generation_times.append(time.perf_counter() - start)

        def training_step(self, model, inputs, num_items_in_batch=None):
            start = time.perf_counter()
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                step_times.append(time.perf_counter() - start)

    return TimedGRPOTrainer
