"""Per-token log-probs of completions under a causal LM, in length-bucketed micro-batches.

Memory and compute are kept to what the loss needs:
- sequences are sorted by length and packed into micro-batches of at most
  `max_tokens` padded tokens, so little compute goes to padding;
- rows are left-padded, so every completion ends at the last column and the model only
  projects the last (longest completion + 1) hidden states to the vocabulary
  (`logits_to_keep`), never the prompt positions;
- the chosen token's log-prob is logit - logsumexp(logits), computed in fp32 in chunks
  of positions (recomputed in backward), never a full-vocabulary fp32 log_softmax of
  the whole micro-batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

# positions x vocabulary entries per fp32 chunk (64 MiB)
CHUNK_ELEMENTS = 1 << 24


@dataclass
class Batch:
    """A left-padded micro-batch: completions right-aligned in the last `width` columns."""

    rows: list[int]  # indices of the sequences in the caller's list
    input_ids: torch.Tensor  # [B, W]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor  # [B, C]: the completion tokens, right-aligned
    completion_mask: torch.Tensor  # [B, C] bool: a real completion token

    @property
    def width(self) -> int:
        return self.targets.shape[1]


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so that rows x longest row <= max_tokens (a longer row goes alone),
    longest first, neighbours in length together."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)  # the first row is the batch's longest
        else:
            batches.append([i])
    return batches


def make_batch(rows: list[int], prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               pad_id: int, device: torch.device) -> Batch:
    total = [len(prompts[i]) + len(completions[i]) for i in rows]
    width, comp_width = max(total), max(len(completions[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    comp_mask = torch.zeros((len(rows), comp_width), dtype=torch.bool)
    for r, i in enumerate(rows):
        seq = list(prompts[i]) + list(completions[i])
        ids[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[r, width - len(seq):] = 1
        comp_mask[r, comp_width - len(completions[i]):] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    targets = ids[:, width - comp_width:]
    return Batch(rows, ids.to(device), mask.to(device), positions.to(device), targets.to(device), comp_mask.to(device))


def _chosen_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chosen_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] per position, fp32, in chunks of positions."""
    rows, cols, vocab = logits.shape
    step = max(1, CHUNK_ELEMENTS // max(1, rows * vocab))
    # Recompute fp32 chunks in backward instead of keeping them all alive -- unless one chunk
    # covers everything, where recomputing would only add work.
    recompute = torch.is_grad_enabled() and logits.requires_grad and step < cols
    parts = []
    for s in range(0, cols, step):
        args = (logits[:, s:s + step], targets[:, s:s + step], temperature)
        parts.append(checkpoint(_chosen_logprobs, *args, use_reentrant=False) if recompute else _chosen_logprobs(*args))
    return torch.cat(parts, dim=1)


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def batch_logprobs(model: torch.nn.Module, batch: Batch, temperature: float = 1.0,
                   logits_to_keep: bool = True) -> torch.Tensor:
    """[B, C] log pi(y_t | prompt, y_<t) for the batch's right-aligned completion tokens
    (values at padding positions are meaningless; use `batch.completion_mask`)."""
    keep = batch.width + 1
    kwargs = {"logits_to_keep": keep} if logits_to_keep else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False, **kwargs)
    logits = out.logits[:, -keep:-1]  # the logit at column c predicts the token at c + 1
    return chosen_logprobs(logits, batch.targets, temperature)


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                      *, pad_id: int, max_tokens: int, temperature: float = 1.0,
                      device: torch.device | None = None, logits_to_keep: bool = True,
                      passes: int | None = None) -> list[torch.Tensor]:
    """log pi(y_t | prompt, y_<t) for every (prompt, completion) pair, as 1-D fp32 CPU tensors.

    The pairs go in `plan_micro_batches` micro-batches, one forward each; `passes` (at least that
    many) pads with idle one-token forwards up to `passes` forwards in all: under FSDP every forward
    is a collective, so processes with fewer rows must still run as many forwards as the busiest."""
    device = device or next(model.parameters()).device
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    result: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    plan = plan_micro_batches(lengths, max_tokens)
    if passes is not None and passes < len(plan):
        raise ValueError(f"sequence_logprobs: {len(plan)} micro-batches planned but only {passes} passes allowed")
    for rows in plan:
        batch = make_batch(rows, prompts, completions, pad_id, device)
        lp = batch_logprobs(model, batch, temperature, logits_to_keep).float().cpu()
        for r, i in enumerate(rows):
            result[i] = lp[r, batch.width - len(completions[i]):].clone()
    for _ in range((passes or 0) - len(plan)):
        idle_forward(model, pad_id, device)
    return result


def idle_forward(model: torch.nn.Module, pad_id: int, device: torch.device) -> torch.Tensor:
    """One forward of a single pad token: a process without rows in a pass still joins the pass's
    collectives (FSDP's parameter gathers; DDP's buffer broadcast). Returns the logits."""
    return model(input_ids=torch.tensor([[pad_id]], device=device)).logits


def right_align(values: Sequence[torch.Tensor], rows: list[int], width: int, fill: float = 0.0) -> torch.Tensor:
    """Stack per-sequence 1-D tensors into [len(rows), width], right-aligned like `make_batch`."""
    out = torch.full((len(rows), width), fill, dtype=torch.float32)
    for r, i in enumerate(rows):
        v = values[i]
        if len(v):
            out[r, width - len(v):] = v
    return out
