"""Evaluation on the paper's six maths benchmarks (Table 1 of P^2O): `dspy-p2o eval` / `dspy-p2o score`."""

from dspy_p2o.evaluation.prompting import PROMPT_MODES, RAW_INSTRUCTION, Prompting, make_prompting
from dspy_p2o.evaluation.protocol import Protocol, protocol_for
from dspy_p2o.evaluation.report import load_results, results_table, summarize
from dspy_p2o.evaluation.runner import evaluate, run_benchmark
from dspy_p2o.evaluation.scoring import AnswerExtractor, Extracted, Scored, score_completions
from dspy_p2o.passk import pass_at_k

__all__ = [
    "AnswerExtractor", "Extracted", "PROMPT_MODES", "Prompting", "Protocol", "RAW_INSTRUCTION", "Scored",
    "evaluate", "load_results", "make_prompting", "pass_at_k", "protocol_for", "results_table",
    "run_benchmark", "score_completions", "summarize",
]
