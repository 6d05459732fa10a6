"""Prefix attention on a GPU: numerics and speed of dstune's paths, with the alternatives beside them.

    python benchmarks/prefix_attention.py [--quick]

Paths (the prefix method's `attention` option picks one): "sdpa" (auto, the default for unmasked sequences:
prefix concatenated, flash attention with lower-right causality, no mask), "split" (the sequence part on
the kernel plain causal SDPA runs, the prefix part beside it, merged by log-sum-exp) and "kernel" (the
CUDA kernel; it also masks padded keys).
1. Numerics: forward output and all five gradients (dq, dk, dv, dprefix_k, dprefix_v) against a float64
   reference on fresh random inputs, over batch, heads, GQA ratio, sequence lengths that are not
   multiples of the tiles, P in {1, 16, 64, 128}, padding (kernel only), bf16 and fp16. Relative error
   (Frobenius) must be <= 1e-2 with no NaN.
2. Speed, forward+backward (median of triton's do_bench): both paths, PEFT's way (prefix expanded over
   the batch, concatenated, explicit mask) and FlexAttention with a block mask, each as a ratio to plain
   causal SDPA without a prefix; `ok` compares dstune's faster path (`best`) with the work floor
   1.05 * (S/2 + P) / (S/2).
Prints a table for each; exits 1 if any numerics row fails.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def reference(q, k, v, pk, pv, key_valid, causal, scale):
    """float64: concatenate, explicit mask, softmax (all on the GPU, in float64)."""
    q, k, v, pk, pv = (t.double() for t in (q, k, v, pk, pv))
    B, Hq, Sq, _ = q.shape
    Hkv, P, Sk = pk.shape[0], pk.shape[1], k.shape[2]
    keys = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2).repeat_interleave(Hq // Hkv, 1)
    vals = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2).repeat_interleave(Hq // Hkv, 1)
    allowed = torch.ones(B, Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
    if key_valid is not None:
        allowed &= key_valid.bool()[:, None, :]
    allowed = torch.cat([torch.ones(B, Sq, P, dtype=torch.bool, device=q.device), allowed], -1)[:, None]
    scores = (q @ keys.transpose(-1, -2)) * scale
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vals
    return out.transpose(1, 2)


def numerics_row(path, B, Hq, Hkv, S, P, padded, dtype, D=64, causal=True):
    """Errors of one path ("kernel": the CUDA kernel; "sdpa": dstune's default for unmasked sequences;
    "split": the log-sum-exp merge of two fused attentions)."""
    from dstune.kernels.prefix_cuda import prefix_attention_op
    from dstune.kernels.reference import prefix_attention_lower_right
    from dstune.kernels.split import prefix_attention_split, split_backends
    g = torch.Generator(device="cuda").manual_seed(B * 1000 + S + P)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    q, k, v, pk, pv = r(B, Hq, S, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(Hkv, P, D), r(Hkv, P, D)
    key_valid = None
    if padded:
        key_valid = torch.ones(B, S, dtype=torch.uint8, device="cuda")
        key_valid[-1, S - S // 3:] = 0  # right padding
        key_valid[0, : S // 5] = 0      # left padding
    scale = D ** -0.5
    leaves = [t.double().requires_grad_() for t in (q, k, v, pk, pv)]
    expected = reference(*leaves, key_valid, causal, scale)
    dout = torch.randn(expected.shape, device="cuda", dtype=torch.float64, generator=g)
    expected.backward(dout)
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v, pk, pv)]
    if path == "kernel":
        out, _ = prefix_attention_op(*ins, key_valid, causal, scale)
    elif path == "split":
        backends = split_backends(ins[0], ins[1], ins[3], causal, scale)
        if backends is None:  # SDPA would not fuse these shapes: training takes another path for them
            return {"path": "split (not fused)", "B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "P": P, "pad": padded,
                    "dtype": str(dtype)[6:], **dict.fromkeys(("out", "dq", "dk", "dv", "dpk", "dpv"), float("nan")),
                    "nan": False, "ok": True}
        out = prefix_attention_split(*ins, backends, causal, scale)
    else:
        out = prefix_attention_lower_right(*ins, causal, scale)
    out.backward(dout.to(dtype))
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    errors = {"out": rel(out, expected.detach())}
    for name, t, leaf in zip(("dq", "dk", "dv", "dpk", "dpv"), ins, leaves):
        errors[name] = rel(t.grad, leaf.grad)
    nan = any(torch.isnan(x).any().item() for x in [out] + [t.grad for t in ins])
    ok = not nan and max(errors.values()) <= 1e-2
    return {"path": path, "B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "P": P, "pad": padded, "dtype": str(dtype)[6:],
            **errors, "nan": nan, "ok": ok}


def speed_row(B, Hq, Hkv, S, D, P, dtype=torch.bfloat16):
    from triton.testing import do_bench

    from dstune.kernels.prefix_cuda import prefix_attention_op
    from dstune.kernels.reference import prefix_attention_lower_right
    from dstune.kernels.split import prefix_attention_split, split_backends
    q = torch.randn(B, Hq, S, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    pk = torch.randn(Hkv, P, D, device="cuda", dtype=dtype, requires_grad=True)
    pv = torch.randn_like(pk, requires_grad=True)
    g = torch.randn(B, S, Hq, D, device="cuda", dtype=dtype)
    gq = g.transpose(1, 2)
    rep = Hq // Hkv

    def plain():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1).backward(gq)

    def kernel():
        out, _ = prefix_attention_op(q, k, v, pk, pv, None, True, D ** -0.5)
        out.backward(g)

    def sdpa_lower_right():
        prefix_attention_lower_right(q, k, v, pk, pv, True).backward(g)

    backends = split_backends(q, k, pk, True, None)

    def split():
        prefix_attention_split(q, k, v, pk, pv, backends, True).backward(g)

    def peft_style():
        kk = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2)
        vv = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2)
        mask = torch.ones(S, P + S, device="cuda", dtype=torch.bool).tril(P)
        F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=rep > 1).backward(gq)

    paths = [("plain", plain), ("sdpa", sdpa_lower_right), ("kernel", kernel), ("peft", peft_style)]
    paths += [("split", split)] if backends else []  # None: SDPA would not fuse these shapes
    times = {"split": float("nan")}
    times.update({name: do_bench(fn, warmup=25, rep=100, return_mode="median") for name, fn in paths})
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
        block_mask = create_block_mask(lambda b, h, qi, kj: (kj < P) | (kj - P <= qi), None, None, S, P + S)

        def flex_style():
            kk = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2)
            vv = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2)
            flex(q, kk, vv, block_mask=block_mask, enable_gqa=rep > 1).backward(gq)
        times["flex"] = do_bench(flex_style, warmup=25, rep=100, return_mode="median")
    except Exception as e:  # FlexAttention needs triton and a recent torch
        print(f"(FlexAttention skipped: {str(e).splitlines()[0]})", file=sys.stderr)
        times["flex"] = float("nan")
    floor = 1.05 * (S / 2 + P) / (S / 2)
    x = {name: t / times["plain"] for name, t in times.items()}
    best = min(("sdpa", "split"), key=x.get)
    return {"B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "D": D, "P": P, "plain_ms": times["plain"],
            "sdpa_x": x["sdpa"], "split_x": x["split"], "split_kernels": "+".join(b.name for b in backends or ()),
            "target_x": floor, "best": best, "ok": x[best] <= floor, "kernel_x": x["kernel"], "peft_x": x["peft"],
            "flex_x": x["flex"]}


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda x: f"{x:.2e}" if isinstance(x, float) and x < 0.01 else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer numerics cases, no speed sweep beyond D=64")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/prefix_attention.py: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    cases = [(path, B, Hq, Hkv, S, P, pad, dt)
             for path in ("sdpa", "split", "kernel")
             for (B, Hq, Hkv) in ((1, 4, 4), (2, 8, 2), (3, 8, 1))
             for S in ((77, 256) if args.quick else (1, 77, 130, 256))
             for P in (1, 16, 64, 128)
             for pad in ((False, True) if path == "kernel" else (False,))  # padded batches take only the kernel
             for dt in (torch.bfloat16, torch.float16)]
    numerics = [numerics_row(*c) for c in cases]
    print(f"## numerics vs float64 ({device}; relative Frobenius error, limit 1e-2)\n")
    print(table(numerics))
    shapes = [(8, 32, 32, 2048, 64, P) for P in (16, 64, 128)]
    if not args.quick:
        shapes += [(8, 32, 32, 2048, 128, 64), (8, 32, 8, 2048, 64, 64)]
    speed = [speed_row(*s) for s in shapes]
    print(f"\n## forward+backward time as a multiple of plain causal SDPA ({device}, bf16)\n")
    print(table(speed))
    return 0 if all(r["ok"] for r in numerics) else 1


if __name__ == "__main__":
    sys.exit(main())
