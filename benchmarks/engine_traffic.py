"""What DeepSpeed's engine moves per trainable parameter and step, beside the model's own work (CPU, 1 rank).

    python benchmarks/engine_traffic.py [--zero '{"stage": 2}' ...] [--precision bf16]

Runs a small Llama (15M parameters, 2 x 64 tokens, so the model's activations are small beside its
parameters) under `deepspeed.initialize` on one CPU rank, and counts with dstune's step traffic counter
(`dstune/planning/traffic.py`) the bytes every operator reads and writes in `engine.backward` and
`engine.step` on the third step. The same backward without DeepSpeed is counted on a copy of the model;
the difference is what DeepSpeed's gradient hooks add (copies into buckets, averaging, all-reduce). The
step is the optimizer (torch's single-tensor AdamW here, 92 B/param; DeepSpeed's FusedAdam on a GPU reads
and writes 28) plus ZeRO's own work (casts between bf16 and fp32 copies, flattening, the gradient norm).
Bytes per parameter carry over to any model size: times 1.1e9 parameters / 3 TB/s is the H100 floor of
the same work at the bench shape. Prints a table per ZeRO config and the step's costliest operators.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

from dstune.planning.report import rows_table


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=4000, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def engine_traffic(zero: dict, precision: str) -> dict:
    import deepspeed

    from dstune.planning.traffic import StepTraffic
    model = _model()
    plain = copy.deepcopy(model).to({"bf16": torch.bfloat16, "fp32": torch.float32}[precision])
    params = sum(p.numel() for p in model.parameters())
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "bf16": {"enabled": precision == "bf16"}, "zero_optimization": zero, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    x = torch.randint(0, 4000, (2, 64))
    for _ in range(2):
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    loss = engine(input_ids=x, labels=x).loss
    with StepTraffic() as traffic:
        traffic.phase = "backward"
        engine.backward(loss)
        traffic.phase = "step"
        engine.step()
    with StepTraffic() as alone:
        alone.phase = "backward"
        plain(input_ids=x, labels=x).loss.backward()  # its forward is counted apart, under "forward"
    top = sorted(((op, r) for (p, op), r in traffic.rows.items() if p == "step"), key=lambda kv: -kv[1][1])[:8]
    hooks = traffic.total("backward", 1) - alone.total("backward", 1)
    return {"zero": json.dumps(zero), "hooks B/param": hooks / params,
            "step B/param": traffic.total("step", 1) / params, "step calls": traffic.total("step", 2),
            "step top": ", ".join(f"{op} {r[1] / params:.0f}" for op, r in top)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", action="append", help="a zero_optimization mapping (JSON); repeatable")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29577"), DS_ACCELERATOR="cpu")
    zeros = [json.loads(z) for z in args.zero] if args.zero else [
        {"stage": 2}, {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e7},
        {"stage": 2, "contiguous_gradients": False}]
    rows = [engine_traffic(z, args.precision) for z in zeros]
    print(f"## bytes DeepSpeed moves per trainable parameter and step (CPU, 1 rank, {args.precision})\n")
    print(rows_table(rows, lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
