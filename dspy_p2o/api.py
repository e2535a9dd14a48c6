"""The front door: `dspy_p2o.compile(...)` and the DSPy-style `P2O` optimizer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import dspy

from dspy_p2o.config import P2OConfig
from dspy_p2o.loop import CompileResult, P2OLoop


def compile(program: dspy.Module, trainset: list[dspy.Example], *, metric: Callable, policy: str | Path,
            reflection: str | dspy.BaseLM = "self", valset: list[dspy.Example] | None = None, engine: str = "local",
            run_dir: str | Path | None = None, config: P2OConfig | Mapping[str, Any] | str | Path | None = None,
            **overrides: Any) -> CompileResult:
    """Co-optimise `program`'s prompt and its policy's weights with P^2O.

    Args:
        program: a DSPy program (e.g. `dspy.ChainOfThought("question -> answer")`), one predictor or
            several served by the one policy (compound programs: every call is trained and every
            instruction evolved; README "Compound programs").
        trainset: `dspy.Example`s with the program's input fields and whatever the metric reads.
        metric: `metric(gold, pred, trace=None, pred_name=None, pred_trace=None)` -> float or
            `dspy.Prediction(score=..., feedback=...)` (e.g. `dspy_p2o.rewards.math_metric`).
        policy: a local model directory or hub id: the model that is trained.
        reflection: "self" (the frozen initial policy reflects), "teacher:<litellm model>", or any
            `dspy.LM` object (recorded as "custom" in the run's config).
        engine: "local" (in-process transformers) or "vllm".
        run_dir: where checkpoints, metrics and plots go; an existing run dir resumes.
        config: a P2OConfig, dict or YAML path; keyword `overrides` (bare or dotted field
            names, e.g. `epochs=2`, `lr=1e-5`, `trainer.distill=False`) win.

    Returns a CompileResult whose `.program` answers with the trained weights and the
    program's ORIGINAL instructions, plus `.checkpoint`, `.history` and `.templates`.
    """
    reflection_lm = None if isinstance(reflection, str) else reflection
    spec = reflection if isinstance(reflection, str) else "custom"
    cfg = P2OConfig.load(config, {"policy": str(policy), "reflection": spec, "engine": engine, **overrides})
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / time.strftime("p2o-%Y%m%d-%H%M%S")
    loop = P2OLoop(program, trainset, metric=metric, policy=str(policy), config=cfg, run_dir=run_dir, valset=valset,
                   reflection_lm=reflection_lm)
    return loop.run_loop()


class P2O:
    """DSPy-optimizer style: `P2O(metric=..., policy=..., **config).compile(student, trainset=..., valset=...)`."""

    def __init__(self, metric: Callable, *, policy: str | Path, reflection: str = "self", engine: str = "local",
                 run_dir: str | Path | None = None, config: P2OConfig | Mapping[str, Any] | str | Path | None = None,
                 **overrides: Any) -> None:
        self.metric, self.policy, self.reflection, self.engine = metric, policy, reflection, engine
        self.run_dir, self.config, self.overrides = run_dir, config, overrides
        self.result: CompileResult | None = None

    def compile(self, student: dspy.Module, *, trainset: list[dspy.Example],
                valset: list[dspy.Example] | None = None, **kwargs: Any) -> dspy.Module:
        self.result = compile(student, trainset, metric=self.metric, policy=self.policy, reflection=self.reflection,
                              valset=valset, engine=self.engine, run_dir=self.run_dir, config=self.config,
                              **{**self.overrides, **kwargs})
        return self.result.program
