"""Human-facing outputs of a run: PNG plots of the training dynamics and summary.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dspy_p2o.checkpoints import human_bytes, size_bytes
from dspy_p2o.config import P2OConfig, redact
from dspy_p2o.run_dir import RunDir


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_plots(run: RunDir, metrics: list[dict[str, Any]], history: list[dict[str, Any]]) -> list[str]:
    """training.png (reward and validation accuracy per step), hard.png (hard questions per
    epoch: paper Fig. 3) and templates.png (pass@1 / pass@K with vs without templates: Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run.plots.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("train/reward_mean", "train reward"), ("epoch/val/pass@1", "validation pass@1")):
        x, y = _series(metrics, key)
        if x:
            ax.plot(x, y, marker="o" if key.startswith("epoch") else None, label=label)
    ax.set_xlabel("optimizer step"), ax.set_ylabel("accuracy / reward"), ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best"), ax.set_title("Training dynamics")
    written.append(_save(fig, run.plots / "training.png"))

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(epochs, [h.get("hard", 0) for h in history], color="tab:red")
    ax.set_xlabel("epoch"), ax.set_ylabel("hard questions"), ax.set_title("Hard set size per epoch")
    written.append(_save(fig, run.plots / "hard.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, style in (("templated/pass@1", "-o"), ("templated/pass@k", "--o"), ("plain/pass@1", "-s"), ("plain/pass@k", "--s")):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), style, label=key.replace("templated", "with template").replace("plain", "without"))
    ax.set_xlabel("epoch"), ax.set_ylabel("success on templated questions"), ax.set_ylim(-0.02, 1.02)
    ax.set_title("Hard questions: with vs without templates")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    written.append(_save(fig, run.plots / "templates.png"))
    return written


def _save(fig, path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def write_summary(run: RunDir, config: P2OConfig, history: list[dict[str, Any]], assignments: dict[str, list[Any]],
                  checkpoint: str | None, disk: str | None = None) -> None:
    """summary.md; `disk`: where the run writes and what a checkpoint costs (the loop's start line)."""
    arm = "P^2O" if config.method == "p2o" else "GRPO baseline"
    lines = [f"# {arm} run: {run.path.name}", "",
             f"- policy: `{redact(config.policy) or 'see config.yaml'}`, engine `{config.engine}`, "
             f"reflection `{redact(config.reflection)}`"
             + (f" (retries {config.reflection_kwargs.get('num_retries', config.reflection_retries)}, timeout "
                f"{config.reflection_kwargs.get('timeout', config.reflection_timeout_s)} s per attempt)"
                if config.reflection.startswith("teacher:") else ""),
             f"- epochs {len(history)}/{config.epochs}, K = {config.k}, batch {config.batch_size}, "
             f"distill = {config.trainer.distill}, template ratio = {config.trainer.template_ratio}",
             f"- latest checkpoint: `{checkpoint}`" + (f" ({human_bytes(size_bytes(checkpoint))} on disk)"
                                                        if checkpoint and Path(checkpoint).is_dir() else ""),
             *([f"- {disk}"] if disk else []), "",
             "| epoch | step | train reward | hard | templated next | val pass@1 | with template pass@1 | without pass@1 "
             "| metric failures |",
             "|---|---|---|---|---|---|---|---|---|"]
    for h in history:
        cells = [h["epoch"], h["step"], _fmt(h.get("train_reward")), h.get("hard", 0), h.get("templated_questions", 0),
                 _fmt(h.get("val/pass@1")), _fmt(h.get("templated/pass@1")), _fmt(h.get("plain/pass@1")),
                 h.get("metric_failures", "-")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    distinct = {json.dumps(z, sort_keys=True): z for zs in assignments.values() for z in zs}  # dicts: not hashable
    templates = [distinct[key] for key in sorted(distinct)]
    if templates:
        lines += ["", f"## Templates assigned for the next epoch ({len(assignments)} questions)", ""]
        for i, z in enumerate(templates[:10]):  # a template: each predictor's instruction (and demos)
            lines += [f"{i + 1}. candidate program:"] + [
                f"   - `{name}`: {part['instruction']!r}" + (f" with {len(part['demos'])} demos" if "demos" in part else "")
                for name, part in z.items()]
    lines += ["", "Plots: `plots/training.png`, `plots/hard.png`, `plots/templates.png`. "
              "Per-step metrics: `metrics.jsonl`. Templates and scores per epoch: `templates/`."]
    (run.path / "summary.md").write_text("\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"
