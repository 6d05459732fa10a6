"""The best held-out score of a run: `evaluation.keep_best` keeps the trainable state that scored it
(best.safetensors), `evaluation.early_stopping` ends training once it has not improved for `patience`
evaluations. The state lives in results.json ("best"), so a resumed run goes on counting."""
from __future__ import annotations

from dataclasses import dataclass

from dstune.config import EarlyStoppingConfig
from dstune.errors import UserError


@dataclass
class Best:
    watch: EarlyStoppingConfig     # the metric, which way is better, patience, min_delta
    stops: bool                    # early stopping is on (else the best state is only kept)
    step: int | None = None        # the step that scored best so far
    scores: dict | None = None     # its held-out metrics
    since: int = 0                 # evaluations since, none of them better

    @classmethod
    def resumed(cls, watch: EarlyStoppingConfig, stops: bool, results: dict) -> Best:
        """Where an earlier start of the run left off (results.json's "best" of the same metric), else anew."""
        earlier = results.get("best") or {}
        if earlier.get("metric") != watch.metric:
            return cls(watch, stops)
        return cls(watch, stops, earlier["step"], earlier["scores"], earlier.get("since", 0))

    @property
    def value(self) -> float | None:
        return None if self.scores is None else self.scores[self.watch.metric]

    def improved(self, step: int, scores: dict) -> bool:
        """Count the evaluation at `step`: whether it is the new best."""
        metric = self.watch.metric
        if metric not in scores:
            raise UserError(f"evaluation.early_stopping.metric: this run's held-out metrics are "
                            f"{', '.join(scores)}; {metric!r} is not one of them")
        v, delta = scores[metric], self.watch.min_delta
        better = self.value is None or (v < self.value - delta if self.watch.lower_is_better() else v > self.value + delta)
        if better:
            self.step, self.scores, self.since = step, dict(scores), 0
        elif step != self.step:
            self.since += 1
        return better

    def exhausted(self) -> bool:
        """Early stopping's patience is used up."""
        return self.stops and self.since >= self.watch.patience

    def as_dict(self) -> dict:
        return {"step": self.step, "metric": self.watch.metric, "value": self.value, "since": self.since,
                "scores": self.scores}
