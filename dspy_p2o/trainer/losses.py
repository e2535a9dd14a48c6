"""The clipped policy-gradient loss per token, its aggregation variants, and the
template ratio of context distillation (`TemplateRatio`: its one home).

The objective of one mini-batch (paper Alg. 1, phase 1; PPO/GRPO with DAPO's clip-higher):

    J(theta) = 1/N * sum_i sum_t m_it * w_it * min(rho_it * A_i, clip(rho_it, 1 - eps_low, c_it) * A_i)
               - beta * KL(pi_theta || pi_ref),      rho_it = pi_theta(y_it | p_i, y_i<t) / pi_old(y_it | p_i, y_i<t)

p_i is the rollout's gradient prompt (x under context distillation), A_i its group advantage,
m_it the token mask, w_it the token weight (template ratio x truncated IS), c_it the upper
clip (1 + eps_high, or the template's ceiling) and N the aggregation's normaliser.

Everything works on padded [rows, tokens] tensors with a 0/1 `mask`; aggregation takes
the normalisers of the whole mini-batch so that micro-batch losses add up to exactly the
mini-batch loss (gradient accumulation does not change the objective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspy_p2o.config import LOSS_AGGREGATIONS, TEMPLATE_RATIO_MODES


@dataclass
class TokenLoss:
    loss: torch.Tensor  # [rows, tokens], not yet masked or aggregated
    ratio: torch.Tensor  # pi_theta / pi_old, detached
    clipped_low: torch.Tensor  # bool: ratio < 1 - eps_low with A < 0 (the clip is active)
    clipped_high: torch.Tensor  # bool: ratio > 1 + eps_high with A > 0
    kl: torch.Tensor | None  # k3 estimate of KL(pi_theta || pi_ref) per token, detached


def token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *,
               epsilon_low: float = 0.2, epsilon_high: float = 0.28, weights: torch.Tensor | None = None,
               ref_logp: torch.Tensor | None = None, beta: float = 0.0,
               upper: torch.Tensor | None = None) -> TokenLoss:
    """-w_t * min(rho_t * A, clip(rho_t, 1 - eps_low, c_t) * A) + beta * KL_t per token (the module's J).

    `advantages` is one value per row; `weights` (detached, per token) carries the
    truncated importance-sampling and template-ratio factors. `upper` (per token) replaces
    1 + eps_high as the upper clip (see `template_clip_upper`); a token whose ceiling is raised
    gets the gradient weight min(ratio, 1 + eps_high) (`_raised_ceiling_loss`). The KL term is the k3
    estimator exp(ref - logp) - (ref - logp) - 1 (unbiased, non-negative).
    """
    adv = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    r = ratio.detach()
    high = 1 + epsilon_high if upper is None else upper
    clipped_low, clipped_high = (r < 1 - epsilon_low) & (adv < 0), (r > high) & (adv > 0)
    if upper is None:
        loss = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, high) * adv)
    else:
        loss = _raised_ceiling_loss(logp, r, adv, epsilon_high, upper, clipped_low | clipped_high)
    if weights is not None:
        loss = loss * weights
    kl = None
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probs")
        delta = ref_logp - logp
        kl_tok = torch.exp(delta) - delta - 1
        loss = loss + beta * kl_tok
        kl = kl_tok.detach()
    return TokenLoss(loss, r, clipped_low, clipped_high, kl)


def _raised_ceiling_loss(logp: torch.Tensor, r: torch.Tensor, adv: torch.Tensor, epsilon_high: float,
                         upper: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
    """PPO's clipped surrogate with a per-token ceiling `upper`; a token whose ceiling was
    raised has its gradient weight held at min(ratio, 1 + eps_high).

    PPO's gradient is A * ratio * grad log pi. Inside PPO's own trust region the ratio is
    ~1; under a raised ceiling it may reach e^20 for a token the template unlocked (and the
    same token in a failed rollout, A < 0, is pushed down with that weight too). That one
    token then owns the mini-batch's norm-clipped gradient: measured in the toy world, grad
    norm 1e6 and easy skills lost within an epoch. Holding its weight keeps it one token
    among others while it may still climb up to its ceiling.
    """
    raised = upper > 1 + epsilon_high  # tokens with a raised ceiling; the others get PPO's gradient exactly
    weight = torch.where(raised, r.clamp(max=1 + epsilon_high), r)  # r: the detached ratio
    live = torch.where(clipped, torch.ones_like(r), torch.exp(logp - logp.detach()))  # value 1; gradient only unclipped
    return -weight * live * adv


def aggregate(loss: torch.Tensor, mask: torch.Tensor, agg: str, *, num_sequences: int, num_tokens: int,
              norm_length: int) -> torch.Tensor:
    """Reduce masked per-token losses of (part of) a mini-batch to its share of the mini-batch loss.

    grpo: mean over each sequence's tokens, then mean over the mini-batch's sequences.
    dapo: sum over tokens / tokens of the mini-batch (every token weighs the same).
    dr_grpo: sum over tokens / (sequences of the mini-batch * norm_length), a constant
    length so that long and short answers are not re-weighted.
    """
    mask = mask.to(loss.dtype)
    if agg == "grpo":
        per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / max(1, num_sequences)
    if agg == "dapo":
        return (loss * mask).sum() / max(1, num_tokens)
    if agg == "dr_grpo":
        return (loss * mask).sum() / max(1, num_sequences * norm_length)
    raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {agg!r}")


def truncated_is_weights(trainer_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """min(cap, pi_trainer / pi_engine) per token: corrects the engine/trainer mismatch (TIS)."""
    return torch.exp(trainer_logp - behaviour_logp).clamp(max=cap)


# ---------------------------------------------------------------------- context distillation's template ratio


@dataclass(frozen=True)
class TemplateRatio:
    """Everything the trainer does with the template ratio of a distilled token,

        r_t = pi(y_t | x, y_<t) / pi(y_t | x~, y_<t),   x~ = T(x, z), both taken before the update:

    `mode` turns r_t into the token's weight and mask (`weights`: the authors' mask drops tokens
    with r_t outside `bounds`), and `clip` raises the token's upper clip to the template's own
    probability (`ceiling`). Plain rows have no ratio. The trainer takes the log-probs and
    calls these; every other use of the ratio goes through this class.
    """

    mode: str = "mask"
    bounds: tuple[float, float] = (0.01, 10.0)
    clip: bool = False
    epsilon_high: float = 0.28

    @property
    def needs_old_logprobs(self) -> bool:
        """Whether a distilled row needs log pi_old(y | x) before the update (else all its tokens
        weigh 1 under PPO's usual clip)."""
        return self.mode != "off" or self.clip

    def weights(self, logp_x: torch.Tensor, logp_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, kept) per token of one distilled completion: `template_ratio_weights`."""
        return template_ratio_weights(logp_x, logp_tilde, self.mode, self.bounds)

    def ceiling(self, logp_x: torch.Tensor, logp_tilde: torch.Tensor) -> torch.Tensor:
        """The upper clip c_t per token of one distilled completion (`clip` on): `template_clip_upper`."""
        return template_clip_upper(logp_x, logp_tilde, self.epsilon_high)


def template_ratio_weights(logp_x: torch.Tensor, logp_tilde: torch.Tensor, mode: str,
                           bounds: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (weight, kept) from r = pi(y_t | x) / pi(y_t | x~), both taken before the update.

    mask: weight 1 inside [lo, hi], 0 outside (no gradient; not counted in the loss).
    soft: weight min(1, r / lo, hi / r): full inside the bounds, fading with the distance
        outside them, so no token is dropped outright.
    off: weight 1.
    `kept` is False where the mask drops the token.
    """
    if mode not in TEMPLATE_RATIO_MODES:
        raise ValueError(f"template_ratio must be one of {TEMPLATE_RATIO_MODES}, got {mode!r}")
    lo, hi = bounds
    log_r = (logp_x - logp_tilde).float()
    ones = torch.ones_like(log_r)
    if mode == "off":
        return ones, ones.bool()
    inside = (log_r >= torch.log(torch.tensor(lo))) & (log_r <= torch.log(torch.tensor(hi)))
    if mode == "mask":
        return inside.float(), inside
    r = log_r.exp()
    return torch.minimum(torch.minimum(ones, r / lo), hi / r), ones.bool()


def template_clip_upper(logp_x: torch.Tensor, logp_tilde: torch.Tensor, epsilon_high: float) -> torch.Tensor:
    """Upper clip per distilled token: max(1 + eps_high, pi(y_t | x~) / pi_old(y_t | x)).

    PPO's trust region lets pi(y_t | x) gain at most log(1 + eps_high) (~0.25 nats) per batch,
    while a token the template unlocked can start tens of nats lower under x: distillation
    would then take dozens of epochs (measured in the toy world, RESULTS.md). The template's
    own probability is the target of distillation, so it is a natural ceiling: a token may
    climb up to it, never beyond, and tokens already likelier under x keep the usual clip.
    """
    return torch.maximum(torch.exp(logp_tilde - logp_x), torch.full_like(logp_x, 1 + epsilon_high))


def template_ratio_metrics(logp_x: list[torch.Tensor], logp_tilde: list[torch.Tensor], kept: list[torch.Tensor],
                           weights: list[torch.Tensor]) -> dict[str, float]:
    """The distilled tokens' log r_t (mean, min, max, median ratio) and the share the mask dropped."""
    if not logp_x:
        return {}
    log_r = torch.cat([x - t for x, t in zip(logp_x, logp_tilde)])
    k, w = torch.cat(kept), torch.cat(weights)
    return {"template_log_ratio_mean": log_r.mean().item(), "template_log_ratio_min": log_r.min().item(),
            "template_log_ratio_max": log_r.max().item(), "template_ratio_median": log_r.median().exp().item(),
            "template_masked_frac": 1.0 - k.float().mean().item(), "template_weight_mean": w.mean().item()}
