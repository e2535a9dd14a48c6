"""Phase 2 of P^2O: hard-set mining, template proposal (GEPA, few-shot demo sets), Pareto front and template assignment."""

from dspy_p2o.config import PromptPhaseConfig  # with the run's config (config.py), importable from here too
from dspy_p2o.prompt_phase.evaluation import PolicyStudent
from dspy_p2o.prompt_phase.gepa_phase import PromptPhaseResult, metric_call_budget, run_prompt_phase, split_hard_set
from dspy_p2o.prompt_phase.hard import mine_hard, success_rates
from dspy_p2o.prompt_phase.pool import assign_templates, greedy_cover, pareto_front, solved_by
from dspy_p2o.prompt_phase.reflection import close_reflection_lm, make_reflection_lm

__all__ = ["PolicyStudent", "PromptPhaseConfig", "PromptPhaseResult", "assign_templates", "close_reflection_lm",
           "greedy_cover", "make_reflection_lm", "metric_call_budget", "mine_hard",
           "pareto_front", "run_prompt_phase", "solved_by", "split_hard_set", "success_rates"]
