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


TEMPLATE_SERIES = (  # (history key, line style, legend): paper Fig. 4
    ("templated/pass@1", "-o", "with its template: pass@1 (mean reward)"),
    ("templated/pass@k", "--o", "with its template: pass@K (any of K succeeds)"),
    ("plain/pass@1", "-s", "without (plain rollouts): pass@1"),
    ("plain/pass@k", "--s", "without (plain rollouts): pass@K"),
)
NO_TEMPLATES = ("No question was rolled out with a template in this run:\n"
                "templates found after an epoch are used in the next one.\n"
                "Why none were: the `reason` in templates/epoch-N.json.")


def epoch_ticks(epochs: list[int], max_ticks: int = 10) -> list[int]:
    """Integer x ticks for an epoch axis: every epoch, or every n-th (and the last) when there are many."""
    if not epochs:
        return []
    first, last = min(epochs), max(epochs)
    stride = max(1, -(-(last - first + 1) // max_ticks))
    ticks = list(range(first, last + 1, stride))
    return ticks if ticks[-1] == last else ticks + [last]


def _epoch_axis(ax, epochs: list[int]) -> None:
    ticks = epoch_ticks(epochs)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    if ticks:
        ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
    ax.set_xlabel("epoch")


def _figure():
    """A figure and its axes, outside pyplot (no global state, no display backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    return fig, fig.subplots()


def _no_data(ax, message: str) -> None:
    """A chart with nothing to draw says so in words instead of showing empty axes."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes)


def training_figure(metrics: list[dict[str, Any]]):
    """Reward of every phase-1 batch and validation pass@1 (without templates) per optimiser step."""
    fig, ax = _figure()
    for key, label in (("train/reward_mean", "train reward (phase-1 rollouts, mean)"),
                       ("epoch/val/pass@1", "validation pass@1, no template")):
        x, y = _series(metrics, key)
        if x:
            ax.plot(x, y, marker="o" if key.startswith("epoch") else None, label=label)
    ax.set_title("Training dynamics")
    if not ax.get_legend_handles_labels()[0]:
        _no_data(ax, "No batch has been trained yet.")
        return fig
    ax.set_xlabel("optimizer step"), ax.set_ylabel("reward / pass@1"), ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best", fontsize=8)
    return fig


def hard_figure(history: list[dict[str, Any]]):
    """Hard training questions per epoch (paper Fig. 3)."""
    fig, ax = _figure()
    ax.set_title("Hard set size per epoch (training questions)")
    if not history:
        _no_data(ax, "No epoch has finished yet.")
        return fig
    epochs = [h["epoch"] for h in history]
    ax.bar(epochs, [h.get("hard", 0) for h in history], color="tab:red",
           label="hard: training questions the policy failed that epoch")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _epoch_axis(ax, epochs)
    ax.set_ylabel("hard questions"), ax.legend(loc="best", fontsize=8)
    return fig


def templates_figure(history: list[dict[str, Any]]):
    """Success of the templated questions' rollouts with vs without their templates, per epoch (paper Fig. 4)."""
    fig, ax = _figure()
    ax.set_title("Questions rolled out with templates: with vs without them")
    for key, style, label in TEMPLATE_SERIES:
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    if not ax.get_legend_handles_labels()[0]:
        _no_data(ax, NO_TEMPLATES)
        return fig
    _epoch_axis(ax, [h["epoch"] for h in history])
    ax.set_ylabel("success rate"), ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best", fontsize=8)
    return fig


def write_plots(run: RunDir, metrics: list[dict[str, Any]], history: list[dict[str, Any]]) -> list[str]:
    """training.png (reward and validation accuracy per step), hard.png (hard questions per
    epoch: paper Fig. 3) and templates.png (pass@1 / pass@K with vs without templates: Fig. 4).
    A chart without data says so in words."""
    run.plots.mkdir(parents=True, exist_ok=True)
    return [_save(training_figure(metrics), run.plots / "training.png"),
            _save(hard_figure(history), run.plots / "hard.png"),
            _save(templates_figure(history), run.plots / "templates.png")]


def _save(fig, path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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
    lines += ["", *COLUMNS]
    lines += prompt_phase_lines(run, [h["epoch"] for h in history])
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

COLUMNS = [
    "Columns (epochs numbered from 1, as the console and the files under `templates/`, `hard/` and `rewards/`):",
    "- **step**: optimizer steps so far; **train reward**: mean reward of all the epoch's phase-1 rollouts, "
    "templated ones included.",
    "- **hard**: training questions the policy failed that epoch (mean reward below `tau`; with `near_hard` also "
    "one success in K), the set the prompt phase after it worked on; **templated next**: those of them assigned "
    "templates for the next epoch.",
    "- **val pass@1**: the validation set answered WITHOUT templates (greedy when `eval_k` is 1).",
    "- **with template pass@1** / **without pass@1**: over the questions rolled out with templates that epoch, "
    "the mean reward of their templated rollouts vs of their plain rollouts (`plain_per_group` of each group); "
    "`-` when no question had a template (or no plain rollout). The gap is what the template still adds "
    "over the weights: context distillation closes it.",
    "- **metric failures**: metric calls that raised or timed out (scored 0).",
]


def prompt_phase_lines(run: RunDir, epochs: list[int]) -> list[str]:
    """summary.md's table of the prompt phases that ran: what they proposed, spent and cost
    (templates/epoch-N.json)."""
    rows = []
    for number in epochs:
        path = run.templates_file(number)
        record = json.loads(path.read_text()) if path.exists() else {}
        if not record.get("ran"):
            continue
        cost, pool = record.get("cost", {}), record.get("pool", [])
        student, reflection = cost.get("student_lm", {}), cost.get("reflection_lm", {})
        sources = {s: sum(1 for p in pool if p.get("source") == s) for s in ("gepa", "fewshot")}
        usd = cost.get("cost_usd")
        calls = cost.get("metric_calls_gepa", 0) + cost.get("metric_calls_fewshot", 0)
        cells = [number, cost.get("optimizer", "gepa"), record.get("hard", "-"),
                 f"{sources['gepa']} / {sources['fewshot']}", cost.get("questions_assigned", 0),
                 f"{calls} / {cost.get('metric_calls_budget', '-')}",
                 student.get("input_tokens", 0) + student.get("output_tokens", 0),
                 f"{reflection.get('calls', 0)} / {reflection.get('input_tokens', 0) + reflection.get('output_tokens', 0)}",
                 "-" if usd is None else f"{usd:.4f}", cost.get("wall_time_s", "-"),
                 "" if record.get("reason") == "ok" else record.get("reason", "")]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    if not rows:
        return []
    header = ("| after epoch | optimizer | hard | candidates gepa / fewshot | questions assigned | metric calls / budget "
              "| student tokens | reflection calls / tokens | teacher USD | seconds | stopped |")
    return ["", "## Prompt phases", "", header, "|---|---|---|---|---|---|---|---|---|---|---|", *rows]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"
