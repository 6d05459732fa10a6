"""Task metrics from maintained libraries: scikit-learn, sacrebleu, rouge-score."""
from __future__ import annotations

import math


def classification_metrics(preds: list[int], labels: list[int]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score
    return {"accuracy": float(accuracy_score(labels, preds)),
            "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0))}


def perplexity(loss_sum: float, tokens: int) -> dict[str, float]:
    """Token-level mean loss and perplexity = exp(mean loss)."""
    mean = loss_sum / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def generation_metrics(preds: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE-1/ROUGE-L F1 (rouge-score, 0-1)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(preds, refs)]
    n = max(len(scores), 1)
    return {"bleu": float(sacrebleu.corpus_bleu(preds, [refs]).score),
            "rouge1": sum(s["rouge1"].fmeasure for s in scores) / n,
            "rougeL": sum(s["rougeL"].fmeasure for s in scores) / n}
