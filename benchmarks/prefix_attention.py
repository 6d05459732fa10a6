"""Prefix attention: numerics and speed of dstune's paths, with the alternatives beside them.

    python benchmarks/prefix_attention.py [--quick] [--cpu]

Paths (the prefix method's `attention` option picks one): "shifted" (auto, the default for unmasked
sequences: plain causal SDPA over P placeholder queries + the sequence, so it runs plain attention's kernel),
"lower-right" (prefix concatenated, SDPA with lower-right causality: flash attention on CUDA), "split" (the
sequence part on the kernel plain causal SDPA runs, the prefix part beside it, merged by log-sum-exp) and
"kernel" (the CUDA kernel; it also masks padded keys).
1. Numerics: forward output and all five gradients (dq, dk, dv, dprefix_k, dprefix_v) against a float64
   reference on fresh random inputs, over batch, heads, GQA ratio, sequence lengths that are not
   multiples of the tiles, P in {1, 16, 64, 128}, padding (kernel only), bf16 and fp16. Relative error
   (Frobenius) must be <= 1e-2 with no NaN.
2. Speed, forward+backward (median of triton's do_bench): every path, PEFT's way (prefix expanded over
   the batch, concatenated, explicit mask) and FlexAttention with a block mask, each as a ratio to plain
   causal SDPA without a prefix; `ok` compares dstune's fastest SDPA-based path (`best`) with the work floor
   1.05 * (S/2 + P) / (S/2).
`--cpu` runs both on the CPU instead (bf16 numerics, no CUDA kernel or FlexAttention; speed by
torch.utils.benchmark at B2 H8 S1024). Prints a table for each; exits 1 if any numerics row fails.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

SDPA_PATHS = ("shifted", "lower-right", "split")  # dstune's paths built on fused SDPA kernels


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


def numerics_row(path, B, Hq, Hkv, S, P, padded, dtype, D=64, causal=True, device="cuda"):
    """Errors of one path (one of SDPA_PATHS, or "kernel": the CUDA kernel)."""
    from dstune.kernels import prefix_attention
    from dstune.kernels.prefix_cuda import prefix_attention_op
    from dstune.kernels.split import split_backends
    g = torch.Generator(device=device).manual_seed(B * 1000 + S + P)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    q, k, v, pk, pv = r(B, Hq, S, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(Hkv, P, D), r(Hkv, P, D)
    key_valid = None
    if padded:
        key_valid = torch.ones(B, S, dtype=torch.uint8, device=device)
        key_valid[-1, S - S // 3:] = 0  # right padding
        key_valid[0, : S // 5] = 0      # left padding
    scale = D ** -0.5
    leaves = [t.double().requires_grad_() for t in (q, k, v, pk, pv)]
    expected = reference(*leaves, key_valid, causal, scale)
    dout = torch.randn(expected.shape, device=device, dtype=torch.float64, generator=g)
    expected.backward(dout)
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v, pk, pv)]
    if path == "kernel":
        out, _ = prefix_attention_op(*ins, key_valid, causal, scale)
    elif path == "split" and split_backends(ins[0], ins[1], ins[3], causal, scale) is None:
        # SDPA would not fuse these shapes: training takes another path for them
        return {"path": "split (not fused)", "B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "P": P, "pad": padded,
                "dtype": str(dtype)[6:], **dict.fromkeys(("out", "dq", "dk", "dv", "dpk", "dpv"), float("nan")),
                "nan": False, "ok": True}
    else:
        out = prefix_attention(*ins, None, causal, scale, path=path)
    out.backward(dout.to(dtype))
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    errors = {"out": rel(out, expected.detach())}
    for name, t, leaf in zip(("dq", "dk", "dv", "dpk", "dpv"), ins, leaves):
        errors[name] = rel(t.grad, leaf.grad)
    nan = any(torch.isnan(x).any().item() for x in [out] + [t.grad for t in ins])
    ok = not nan and max(errors.values()) <= 1e-2
    return {"path": path, "B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "P": P, "pad": padded, "dtype": str(dtype)[6:],
            **errors, "nan": nan, "ok": ok}


def _timer(device: str):
    """Median milliseconds of fn() on the device."""
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")
    from torch.utils.benchmark import Timer
    return lambda fn: Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=2).median * 1e3


def speed_row(B, Hq, Hkv, S, D, P, dtype=torch.bfloat16, device="cuda"):
    from dstune.kernels import prefix_attention
    from dstune.kernels.prefix_cuda import prefix_attention_op
    from dstune.kernels.split import split_backends
    q = torch.randn(B, Hq, S, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    pk = torch.randn(Hkv, P, D, device=device, dtype=dtype, requires_grad=True)
    pv = torch.randn_like(pk, requires_grad=True)
    g = torch.randn(B, S, Hq, D, device=device, dtype=dtype)
    gq = g.transpose(1, 2)
    rep = Hq // Hkv
    bench = _timer(device)

    def plain():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=rep > 1).backward(gq)

    def kernel():
        out, _ = prefix_attention_op(q, k, v, pk, pv, None, True, D ** -0.5)
        out.backward(g)

    def sdpa_path(path):
        return lambda: prefix_attention(q, k, v, pk, pv, path=path).backward(g)

    def peft_style():
        kk = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2)
        vv = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2)
        mask = torch.ones(S, P + S, device=device, dtype=torch.bool).tril(P)
        F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=rep > 1).backward(gq)

    backends = split_backends(q, k, pk, True, None)
    paths = [("plain", plain), *((p, sdpa_path(p)) for p in SDPA_PATHS), ("peft", peft_style)]
    paths = [(n, fn) for n, fn in paths if n != "split" or backends]  # None: SDPA would not fuse these shapes
    paths += [("kernel", kernel)] if device == "cuda" else []
    times = dict.fromkeys(("split", "kernel", "flex"), float("nan"))
    times.update({name: bench(fn) for name, fn in paths})
    try:
        if device != "cuda":
            raise RuntimeError("no CUDA device")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
        block_mask = create_block_mask(lambda b, h, qi, kj: (kj < P) | (kj - P <= qi), None, None, S, P + S)

        def flex_style():
            kk = torch.cat([pk[None].expand(B, -1, -1, -1), k], 2)
            vv = torch.cat([pv[None].expand(B, -1, -1, -1), v], 2)
            flex(q, kk, vv, block_mask=block_mask, enable_gqa=rep > 1).backward(gq)
        times["flex"] = bench(flex_style)
    except Exception as e:  # FlexAttention needs triton, a CUDA device and a recent torch
        print(f"(FlexAttention skipped: {str(e).splitlines()[0]})", file=sys.stderr)
    floor = 1.05 * (S / 2 + P) / (S / 2)
    x = {name: t / times["plain"] for name, t in times.items()}
    best = min((p for p in SDPA_PATHS if x[p] == x[p]), key=x.get)  # x != x: NaN, the path did not run
    return {"B": B, "Hq": Hq, "Hkv": Hkv, "S": S, "D": D, "P": P, "plain_ms": times["plain"],
            **{f"{p}_x": x[p] for p in SDPA_PATHS}, "split_kernels": "+".join(b.name for b in backends or ()),
            "target_x": floor, "best": best, "ok": x[best] <= floor, "kernel_x": x["kernel"], "peft_x": x["peft"],
            "flex_x": x["flex"]}


def table(rows: list[dict]) -> str:
    from dstune.planning.report import rows_table
    return rows_table(rows, lambda x: (f"{x:.2e}" if x < 0.01 else f"{x:.3f}") if isinstance(x, float) else str(x))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer numerics cases, no speed sweep beyond D=64")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (no CUDA kernel, no FlexAttention)")
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/prefix_attention.py: needs a CUDA device (or --cpu)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    cases = [(path, B, Hq, Hkv, S, P, pad, dt)
             for path in (*SDPA_PATHS, *(("kernel",) if device == "cuda" else ()))
             for (B, Hq, Hkv) in ((1, 4, 4), (2, 8, 2), (3, 8, 1))
             for S in ((77, 256) if args.quick else (1, 77, 130, 256))
             for P in (1, 16, 64, 128)
             for pad in ((False, True) if path == "kernel" else (False,))  # padded batches take only the kernel
             for dt in ((torch.bfloat16, torch.float16) if device == "cuda" else (torch.bfloat16,))]
    numerics = [numerics_row(*c, device=device) for c in cases]
    print(f"## numerics vs float64 ({name}; relative Frobenius error, limit 1e-2)\n")
    print(table(numerics))
    B, H, S = (8, 32, 2048) if device == "cuda" else (2, 8, 1024)  # smaller on a CPU: seconds per call there
    shapes = [(B, H, H, S, 64, P) for P in (16, 64, 128)]
    if not args.quick:
        shapes += [(B, H, H, S, 128, 64), (B, H, H // 4, S, 64, 64)]
    speed = [speed_row(*s, device=device) for s in shapes]
    print(f"\n## forward+backward time as a multiple of plain causal SDPA ({name}, bf16)\n")
    print(table(speed))
    return 0 if all(r["ok"] for r in numerics) else 1


if __name__ == "__main__":
    sys.exit(main())
