"""The preference objectives, tensors in and tensors out, each as its paper defines it and TRL computes it
(TRL 1.16 is the oracle in tests/test_preference_trl.py). Where the two differ, this says which is followed:

- dpo: Rafailov et al. 2023, `-log σ(β Δ)`, Δ the chosen minus the rejected reply's log-ratio to the
  reference (summed log-probabilities). label_smoothing ε > 0 is cDPO (Mitchell 2023):
  `-(1-ε) log σ(β Δ) - ε log σ(-β Δ)`, as TRL's CPO `sigmoid` loss and TRL's DPO before 1.0 compute it
  (TRL 1.16's DPO `sigmoid` has no smoothing; its `robust` is another, rDPO, loss).
- ipo: Azar et al. 2023, `(Δ - 1/(2β))²` with Δ from log-probabilities averaged over each reply's tokens,
  as TRL does (the paper writes Δ with sums; averaging keeps long replies from dominating).
- simpo: Meng et al. 2024, `-log σ(β (avg_c - avg_r) - γ)` without a reference (ε-smoothed as cDPO), as
  the paper and TRL's CPO `simpo` (with `cpo_alpha` 0) compute it.
- orpo: Hong et al. 2024, `NLL(chosen) - λ log σ(log odds_c - log odds_r)` with averaged log-probabilities;
  the NLL is over the chosen reply's tokens as in the paper (TRL's ORPO also counts the prompt's tokens).
- kto: Ethayarajh et al. 2024, `w_d (1 - σ(β (r - z)))` for good rows and `w_u (1 - σ(β (z - r)))` for bad
  ones, one mean over all rows; z is the batch's KL estimate from mismatched prompt/reply pairs, detached
  and clamped at 0, as TRL computes it.

Rewards are what TRL logs: β × the log-ratio (dpo, ipo, kto; summed log-probabilities), β × the averaged
log-probability (simpo, orpo).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dstune.data.batching import IGNORE


@dataclass
class Logps:
    """Log-probabilities of replies: their sum over each reply's tokens, and the tokens."""
    sum: torch.Tensor     # [N]
    count: torch.Tensor   # [N]

    @property
    def avg(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)

    def split(self) -> tuple[Logps, Logps]:
        """(the first half's, the second half's): chosen and rejected replies of a pair batch."""
        n = self.sum.shape[0] // 2
        return Logps(self.sum[:n], self.count[:n]), Logps(self.sum[n:], self.count[n:])


def reply_logps(logits: torch.Tensor, labels: torch.Tensor) -> Logps:
    """Each row's summed log-probability of its target tokens (labels other than IGNORE; position i predicts
    token i + 1), in fp32, one row at a time so no fp32 copy of the whole batch's logits is made."""
    labels = labels[:, 1:]
    mask = labels != IGNORE
    sums = []
    for row, (lg, lab, m) in enumerate(zip(logits[:, :-1], labels, mask)):
        lg = lg.float()
        picked = lg.gather(-1, lab.clamp(min=0)[:, None])[:, 0] - lg.logsumexp(-1)
        sums.append((picked * m).sum())
    return Logps(torch.stack(sums), mask.sum(-1))


def _smoothed_sigmoid(x: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1 - smoothing) * F.logsigmoid(x) - smoothing * F.logsigmoid(-x)


@dataclass
class PairLosses:
    losses: torch.Tensor          # [B], the objective per pair (without the NLL term)
    chosen_rewards: torch.Tensor  # [B], detached
    rejected_rewards: torch.Tensor
    extras: dict                  # further per-pair values to log (orpo's log odds), detached


def pair_losses(loss: str, beta: float, smoothing: float, gamma: float, policy: tuple[Logps, Logps],
                reference: tuple[Logps, Logps] | None) -> PairLosses:
    """The per-pair objective of `loss` (dpo, ipo, simpo, orpo) from the policy's (chosen, rejected)
    log-probabilities and, for dpo and ipo, the reference's."""
    pc, pr = policy
    extras = {}
    if loss in ("dpo", "ipo"):
        rc, rr = reference
        chosen, rejected = pc.sum - rc.sum, pr.sum - rr.sum
        if loss == "dpo":
            losses = _smoothed_sigmoid(beta * (chosen - rejected), smoothing)
        else:
            losses = ((chosen / pc.count.clamp(min=1) - rejected / pr.count.clamp(min=1)) - 1 / (2 * beta)) ** 2
        return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach(), extras)
    if loss == "simpo":
        losses = _smoothed_sigmoid(beta * (pc.avg - pr.avg) - gamma, smoothing)
    elif loss == "orpo":
        log_odds = (pc.avg - pr.avg) - (torch.log1p(-torch.exp(pc.avg)) - torch.log1p(-torch.exp(pr.avg)))
        ratio = F.logsigmoid(log_odds)
        losses = -beta * ratio
        extras = {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    else:
        raise ValueError(f"not a pair loss: {loss}")
    return PairLosses(losses, beta * pc.avg.detach(), beta * pr.avg.detach(), extras)


def kto_losses(beta: float, desirable_weight: float, undesirable_weight: float, policy: Logps, reference: Logps,
               desirable: torch.Tensor, kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weighted per-row KTO loss, the rows' rewards (detached)); `kl`: the batch's KL estimate (a
    detached scalar, clamped at 0 by the caller)."""
    ratio = policy.sum - reference.sum
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, good, bad), beta * ratio.detach()
