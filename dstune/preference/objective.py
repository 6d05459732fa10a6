"""A preference objective at work: the policy's forward over a micro-batch's chosen and rejected replies (one
forward over both), the reference's log-probabilities, the loss, and what is logged, in TRL's names.

A step's loss is the mean over the global batch's pairs (rows, for kto): micro-batches hold equal numbers of
them, so each micro-batch's mean, averaged by DeepSpeed over accumulation and ranks, is the global mean. The
NLL term (`sft_weight`, orpo's) is the token mean over the global batch's chosen replies, weighted as the
supervised loss is. kto's KL estimate is taken over the whole global batch at the start of each step, so it
is the same on every rank and for any split of the batch into micro-batches.
"""
from __future__ import annotations

import contextlib

import torch

from dstune.config import PreferenceConfig
from dstune.errors import UserError
from dstune.methods.base import base_model_only
from dstune.preference.losses import Logps, kto_losses, pair_losses, reply_logps

FORWARD_KEYS = ("input_ids", "attention_mask")


class Tally:
    """Sums and counts of what a step or an evaluation logs, reduced over micro-batches and ranks."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, name: str, values: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        values = values.detach().double()
        if keep is not None:
            values = values[keep]
        total = self.sums.setdefault(name, [0.0, 0.0])
        total[0] += float(values.sum())
        total[1] += values.numel()

    def add_total(self, name: str, total: float, count: float) -> None:
        s = self.sums.setdefault(name, [0.0, 0.0])
        s[0] += total
        s[1] += count

    def reduced(self, device) -> dict[str, float]:
        """Means over every rank's sums (a collective when a process group runs: every rank calls it with the
        same names)."""
        import torch.distributed as dist

        names = sorted(self.sums)
        t = torch.tensor([self.sums[n] for n in names], dtype=torch.float64, device=device).reshape(-1, 2)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        return {n: float(s / c) for n, (s, c) in zip(names, t.tolist()) if c}


class Reference:
    """The reference model's log-probabilities of a batch's replies."""

    def logps(self, engine, batch: dict, prefix: str = "") -> Logps:
        raise NotImplementedError

    def held_bytes(self) -> int:
        """The bytes of weights this reference holds on this rank beside the policy's (memory.json)."""
        return 0


class SteppedAside(Reference):
    """The policy itself with its methods stepped aside (`base_model_only`): the frozen base, no second copy."""

    @torch.no_grad()
    def logps(self, engine, batch, prefix=""):
        with base_model_only(getattr(engine, "module", engine)), eval_mode(engine):
            return forward_logps(engine, batch, prefix)


class Frozen(Reference):
    """Another model in memory (a frozen copy of the base, or a model or run dir the recipe names)."""

    def __init__(self, module):
        self.module = module

    @torch.no_grad()
    def logps(self, engine, batch, prefix=""):
        return forward_logps(self.module, batch, prefix)

    def held_bytes(self) -> int:
        """This rank's share: under ZeRO-3 the partition DeepSpeed keeps (`ds_tensor`), else every weight."""
        return sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                   for p in self.module.parameters())


class Precomputed(Reference):
    """Log-probabilities computed once before the first step and kept with the prepared rows."""

    def logps(self, engine, batch, prefix=""):
        return Logps(batch[f"ref_{prefix}logps"].float(), _counts(batch[f"{prefix}labels"]))


@contextlib.contextmanager
def eval_mode(model):
    """The reference is scored without dropout, whatever the policy trains with."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _counts(labels: torch.Tensor) -> torch.Tensor:
    from dstune.data.batching import IGNORE
    return (labels[:, 1:] != IGNORE).sum(-1)


def forward_logps(model, batch: dict, prefix: str = "") -> Logps:
    """`model`'s log-probabilities of the replies in `batch` (`prefix`: "kl_" for kto's mismatched rows)."""
    labels = batch[f"{prefix}labels"]
    out = model(**{k: batch[f"{prefix}{k}"] for k in FORWARD_KEYS}, use_cache=False)
    return reply_logps(out.logits[:, -labels.shape[1]:], labels)  # a soft prompt's positions come first


class Objective:
    """The recipe's preference objective with its reference."""

    def __init__(self, cfg: PreferenceConfig, reference: Reference | None):
        self.cfg, self.reference = cfg, reference
        self.beta = cfg.beta_value()
        self.nll_weight = 1.0 if cfg.loss == "orpo" else cfg.sft_weight
        self.kl: torch.Tensor | None = None

    def start_step(self, engine, micro_batches: list[dict], rows: int, keeps: list | None = None) -> None:
        """kto: the KL estimate of a global batch (or a whole held-out set) of `rows` rows from this rank's
        micro-batches (`keeps`: per batch, the rows that count; evaluation's filler does not): the mean over
        every rank's mismatched rows of the policy's minus the reference's log-probability, detached and
        clamped at 0."""
        if self.cfg.loss != "kto":
            return
        import torch.distributed as dist
        total = torch.zeros((), dtype=torch.float64, device=micro_batches[0]["input_ids"].device)
        with torch.no_grad():
            for i, batch in enumerate(micro_batches):
                gap = forward_logps(engine, batch, "kl_").sum - self.reference.logps(engine, batch, "kl_").sum
                total += (gap if keeps is None else gap[keeps[i]]).sum()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        self.kl = (total / rows).clamp(min=0).float()

    @property
    def estimates_kl(self) -> bool:
        return self.cfg.loss == "kto"

    def loss(self, engine, batch: dict, nll_scale: float, tally: Tally, keep: torch.Tensor | None = None
             ) -> torch.Tensor:
        """This micro-batch's loss: the mean over its pairs (rows, kto), plus the NLL term of its chosen
        replies' tokens times `nll_scale` (1 / the global batch's chosen tokens, times accumulation × ranks,
        which DeepSpeed's averaging divides out). What it logs goes into `tally`; rows where `keep` is False
        (evaluation's filler) count nothing there."""
        ref = self.reference.logps(engine, batch) if self.reference is not None else None
        policy = forward_logps(engine, batch)
        if self.cfg.loss == "kto":
            losses = self._kto(policy, ref, batch, tally, keep)
            chosen, sums, counts = batch["desirable"], policy.sum, policy.count
        else:
            losses = self._pairs(policy, ref, tally, keep)
            sums, counts = policy.sum[:len(losses)], policy.count[:len(losses)]
            chosen = torch.ones_like(sums, dtype=torch.bool)
        kept = chosen if keep is None else chosen & keep
        tally.add_total("nll_loss", -float(sums[kept].detach().sum()), float(counts[kept].sum()))
        tally.add("loss", losses, keep)
        loss = losses.mean()
        if self.nll_weight:
            loss = loss - self.nll_weight * sums[chosen].sum() * nll_scale
        return loss

    def metrics(self, means: dict[str, float]) -> dict[str, float]:
        """What a step or an evaluation reports from its reduced tally: the loss with its NLL term, and for kto
        the margin of the mean rewards (its rows are not pairs)."""
        out = dict(means)
        if self.nll_weight and "nll_loss" in out:
            out["loss"] = out["loss"] + self.nll_weight * out["nll_loss"]
        if self.cfg.loss == "kto" and "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    def _pairs(self, policy: Logps, ref: Logps | None, tally: Tally, keep) -> torch.Tensor:
        c = self.cfg
        out = pair_losses(c.loss, self.beta, c.label_smoothing, c.simpo_gamma, policy.split(),
                          ref.split() if ref is not None else None)
        pc, pr = policy.split()
        for name, v in (("rewards/chosen", out.chosen_rewards), ("rewards/rejected", out.rejected_rewards),
                        ("rewards/accuracies", (out.chosen_rewards > out.rejected_rewards).double()),
                        ("rewards/margins", out.chosen_rewards - out.rejected_rewards),
                        ("logps/chosen", pc.sum), ("logps/rejected", pr.sum), *out.extras.items()):
            tally.add(name, v, keep)
        return out.losses

    def _kto(self, policy: Logps, ref: Logps, batch: dict, tally: Tally, keep) -> torch.Tensor:
        c, good = self.cfg, batch["desirable"]
        losses, rewards = kto_losses(self.beta, c.desirable_weight, c.undesirable_weight, policy, ref, good,
                                     self.kl if self.kl is not None else torch.zeros(()))
        keep = torch.ones_like(good) if keep is None else keep
        for name, rows in (("chosen", good & keep), ("rejected", ~good & keep)):
            tally.add(f"rewards/{name}", rewards[rows])
            tally.add(f"logps/{name}", policy.sum[rows])
        if self.kl is not None:
            tally.add_total("kl", float(self.kl), 1.0)
        return losses


def reference_choice(cfg, methods: list) -> str:
    """preference.reference made concrete (auto: base where every method leaves the base frozen, else
    precompute), or "" for the objectives that have none; a choice the methods cannot honour is refused."""
    p = cfg.preference
    if not p.uses_reference():
        if p.reference != "auto":
            raise UserError(f"preference.reference: {p.loss} needs no reference model (leave preference.reference "
                            "unset)")
        return ""
    frozen_base = all(m.steps_aside for m in methods)
    if p.reference == "auto":
        return "base" if frozen_base else "precompute"
    if p.reference == "base" and not frozen_base:
        changing = ", ".join(m.name for m in methods if not m.steps_aside)
        raise UserError(f"preference.reference: base is the model with its methods stepped aside, and {changing} "
                        "trains the base's own weights; use copy, precompute or a model folder / run dir")
    return p.reference


def load_reference(cfg, choice: str, tokenizer, ds_config: dict, stage: int, device) -> Reference | None:
    """The reference `choice` names (reference_choice), loaded where it is a model of its own."""
    from dstune.distill.teacher import load_frozen

    if not choice:
        return None
    if choice == "base":
        return SteppedAside()
    if choice == "precompute":
        return Precomputed()
    if choice == "copy":
        return Frozen(load_copy(cfg, tokenizer, ds_config, stage, device))
    return Frozen(load_frozen(cfg, choice, "preference.reference", tokenizer, None, ds_config, stage, device)[0])


def load_copy(cfg, tokenizer, ds_config: dict, stage: int, device):
    """A frozen copy of the recipe's base model, built as the policy's base is (same seed for a tiny one)."""
    from transformers.integrations import HfDeepSpeedConfig

    from dstune.distill.teacher import frozen, frozen_ds_config
    from dstune.models.loading import load_model

    keep = HfDeepSpeedConfig(frozen_ds_config(ds_config)) if stage == 3 and not cfg.model.tiny else None  # noqa: F841
    torch.manual_seed(cfg.training.seed)
    return frozen(load_model(cfg, tokenizer, None), cfg, ds_config, stage, device)


REFERENCE_WORDS = {"base": "the model with {methods} stepped aside, no second copy",
                   "copy": "a frozen copy of the base model",
                   "precompute": "computed once before the first step with the base model"}


def preference_line(p: PreferenceConfig, choice: str, methods: str) -> str:
    """The start-up line: the objective, its settings and where the reference comes from."""
    settings = {"dpo": f"beta {p.beta_value():g}" + (f", label smoothing {p.label_smoothing:g} (cDPO)"
                                                      if p.label_smoothing else ""),
                "ipo": f"beta {p.beta_value():g}", "simpo": f"beta {p.beta_value():g}, gamma {p.simpo_gamma:g}",
                "orpo": f"lambda {p.beta_value():g}",
                "kto": f"beta {p.beta_value():g}, weights {p.desirable_weight:g} good / {p.undesirable_weight:g} bad"}
    sft = f", NLL weight {p.sft_weight:g}" if p.sft_weight else ""
    where = "no reference model" if not choice else \
        f"reference: {REFERENCE_WORDS[choice].format(methods=methods)}" if choice in REFERENCE_WORDS else \
        f"reference: {choice}"
    return f"preference: {p.loss} ({settings[p.loss]}{sft}); {where}"


def objective_for_run(cfg, methods: list, tokenizer, device) -> Objective:
    """A finished preference run's objective, to score it again (`dstune eval`): its reference as training had
    it; precomputed log-probabilities are those of the base, loaded once more."""
    choice = reference_choice(cfg, methods)
    return Objective(cfg.preference, load_reference(cfg, "copy" if choice == "precompute" else choice, tokenizer,
                                                    {}, 0, device))
