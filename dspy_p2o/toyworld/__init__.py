"""The toy world: a CPU-sized laboratory where P^2O's mechanism is visible in minutes.

`task` (the verifiable task as a DSPy program, its metric and the seeded world),
`policy` (the tiny base policy, pretrained offline and cached), `reflection` (a noisy
rule-inferring reflection LM for GEPA), `experiment` (GRPO vs P^2O and its ablations
through the P^2O loop) and `cli` (`dspy-p2o demo`).
"""
