"""Count the bytes a DeepSpeed engine actually holds, by part, from its tensors."""
from __future__ import annotations

import torch


class _Storages:
    """Sums storage sizes once per storage (views of one flat buffer count once), ignoring meta tensors."""

    def __init__(self):
        self.seen: set[int] = set()

    def __call__(self, tensors) -> int:
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
                continue
            s = t.untyped_storage()
            if s.data_ptr() not in self.seen:
                self.seen.add(s.data_ptr())
                total += s.nbytes()
        return total


def _constants(p: torch.Tensor) -> list[torch.Tensor]:
    """The quantization constants a bitsandbytes weight carries (4-bit: absmax and code tables, with double
    quantization their own; int8: a scale per row): held whole on every rank, beside the weight."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        nested = getattr(state, "state2", None)
        return [state.absmax, state.code] + ([nested.absmax, nested.code] if nested is not None else [])
    scale = getattr(p, "SCB", None)
    return [scale] if isinstance(scale, torch.Tensor) else []


def engine_model_state_bytes(engine) -> dict[str, int]:
    """weights / gradients / optimizer_states bytes held by this rank's engine right now.

    weights: the module's parameters (ZeRO-3: this rank's partitions) and a quantized base's constants;
    optimizer_states: fp32 master partitions plus the optimizer's state tensors (Adam m, v); gradients: gradient
    tensors alive now
    (ZeRO-3 keeps a persistent flat partition buffer; ZeRO-1/2 gradients live only between backward and step).
    """
    count = _Storages()
    opt = engine.optimizer
    params = list(engine.module.parameters())
    scales = [m.state.SCB for m in engine.module.modules()  # 8-bit layers move their row scales here once run
              if isinstance(getattr(getattr(m, "state", None), "SCB", None), torch.Tensor)]
    weights = count([getattr(p, "ds_tensor", p.data) for p in params] + [t for p in params for t in _constants(p)]
                    + scales)
    masters = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat", [])
    inner = getattr(opt, "optimizer", opt)
    states = [t for st in inner.state.values() for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    optimizer_states = count(list(masters) + states)
    grads = [p.grad for p in params] + [m.grad for m in masters]
    grads += [getattr(opt, "grad_partitions_flat_buffer", None)]
    grads += [g for group in (getattr(opt, "averaged_gradients", None) or {}).values() for g in (group or [])] \
        if isinstance(getattr(opt, "averaged_gradients", None), dict) else []
    return {"weights": weights, "gradients": count(grads), "optimizer_states": optimizer_states}
