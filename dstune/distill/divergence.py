"""The distillation term: T^2 * divergence(teacher_T, student_T) per row, a mean over rows, computed a chunk
of rows at a time in fp32 (classification: one row per example; causal LM and seq2seq: one per target token
over the shared vocabulary), so neither the fp32 logits nor the probabilities of the whole batch are held."""
from __future__ import annotations

import math

import torch

from dstune.config import DIVERGENCES


def _divergence_rows(s: torch.Tensor, t: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence per row, its gradient with respect to the student's tempered logits per row) for fp32
    log-probabilities `s` (student) and `t` (teacher). With g = d(divergence)/d(p_s), the softmax's
    Jacobian makes the logits' gradient p_s * (g - <p_s, g>)."""
    ps, pt = s.exp(), t.exp()
    if kind == "forward_kl":    # KL(teacher || student): the gradient is p_s - p_t
        return (pt * (t - s)).sum(-1), ps - pt
    if kind == "reverse_kl":    # KL(student || teacher): g = log p_s - log p_t + 1
        d = (ps * (s - t)).sum(-1)
        return d, ps * ((s - t) - d[:, None])
    m = torch.logaddexp(s, t) - math.log(2.0)  # log of the mixture (p_s + p_t) / 2; g = (log p_s - log m) / 2
    d = 0.5 * (ps * (s - m)).sum(-1) + 0.5 * (pt * (t - m)).sum(-1)
    g = 0.5 * (s - m)
    return d, ps * (g - (ps * g).sum(-1, keepdim=True))


class ChunkedDivergence(torch.autograd.Function):
    """T^2 * sum over rows of divergence(softmax(teacher / T), softmax(student / T)) / denom, `chunk` rows at
    a time in fp32: neither the fp32 logits nor the probabilities of the whole batch are ever held. The
    gradient (student only; the teacher is a constant) is recomputed chunk by chunk in the backward."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str,
                denom: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a in range(0, student.shape[0], chunk):
            s = torch.log_softmax(student[a:a + chunk].float() / temperature, -1)
            t = torch.log_softmax(teacher[a:a + chunk].float() / temperature, -1)
            total += _divergence_rows(s, t, kind)[0].sum()
        ctx.save_for_backward(student, teacher, denom)
        ctx.temperature, ctx.kind, ctx.chunk = temperature, kind, chunk
        return total * temperature ** 2 / denom

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher, denom = ctx.saved_tensors
        T = ctx.temperature
        out = torch.empty_like(student)
        scale = grad * T / denom  # T^2 from the loss, 1/T from the tempered logits
        for a in range(0, student.shape[0], ctx.chunk):
            s = torch.log_softmax(student[a:a + ctx.chunk].float() / T, -1)
            t = torch.log_softmax(teacher[a:a + ctx.chunk].float() / T, -1)
            out[a:a + ctx.chunk] = (_divergence_rows(s, t, ctx.kind)[1] * scale).to(out.dtype)
        return out, None, None, None, None, None


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str = "forward_kl",
                      chunk: int = 1024) -> torch.Tensor:
    """Mean over rows of T^2 * divergence between the tempered teacher and student distributions; rows are
    [rows, classes] logits (one per example, or one per target token)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; one of {', '.join(DIVERGENCES)}")
    denom = torch.tensor(max(student.shape[0], 1), dtype=torch.float32, device=student.device)
    return ChunkedDivergence.apply(student, teacher.detach(), float(temperature), kind, denom, chunk)
