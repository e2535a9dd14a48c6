"""Example: the built-in maths chain-of-thought program and its metric.

Evaluate it on a few MATH500 problems with any LM litellm can reach:

    DSPY_P2O_LM=openai/gpt-4o-mini python examples/math_cot.py
    python examples/math_cot.py --lm openai/Qwen/Qwen3-4B --api-base http://localhost:8000/v1 -n 5

Use it from dspy_p2o as ``program="examples/math_cot.py:build"``.
"""

from __future__ import annotations

import argparse
import os

import dspy

from dspy_p2o.data import load_benchmark
from dspy_p2o.programs import MathCoT
from dspy_p2o.rewards import math_metric


def build() -> dspy.Module:
    """The program to optimise: a fresh MathCoT."""
    return MathCoT()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm", default=os.environ.get("DSPY_P2O_LM"),
                        help="litellm model name, e.g. openai/gpt-4o-mini (default: $DSPY_P2O_LM)")
    parser.add_argument("--api-base", default=os.environ.get("DSPY_P2O_API_BASE"),
                        help="OpenAI-compatible server URL (default: $DSPY_P2O_API_BASE)")
    parser.add_argument("-n", "--num-problems", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    if not args.lm:
        parser.error("name an LM with --lm or the DSPY_P2O_LM environment variable")

    dspy.configure(lm=dspy.LM(args.lm, api_base=args.api_base))
    devset = load_benchmark("math500", limit=args.num_problems)
    evaluate = dspy.Evaluate(devset=devset, metric=math_metric, num_threads=args.threads, display_table=True)
    result = evaluate(build())
    print(f"accuracy on {len(devset)} MATH500 problems: {result.score:.1f}%")


if __name__ == "__main__":
    main()
