"""What many test modules share: running the CLI (cli_runner.py), reading a run's metrics, the workspace's
words, recipes over the workspace's tiny models and data, and small model helpers. No test module imports
another test module."""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import torch
import transformers as T

from dstune.families import FAMILIES as SPECS
from dstune.families import tiny_config
from dstune.methods import apply_methods, build_methods

from cli_runner import LAUNCH_TIMEOUT_S, CliResult, free_port, in_process, in_subprocess, kill_tree, pooled

__all__ = ["LAUNCH_TIMEOUT_S", "CliResult", "free_port", "kill_tree", "run_cli", "ok", "read_metrics", "write_recipe"]

REPO = Path(__file__).resolve().parents[1]

POS = "good great fine lovely superb fun moving clever".split()
NEG = "bad awful dull boring poor weak messy tedious".split()
FILLER = "the movie film plot actor scene was is a an and it this".split()


def run_cli(args: list[str], nproc: int = 1, cwd: Path | None = None, timeout: int = LAUNCH_TIMEOUT_S,
            env: dict | None = None, launcher: str | None = None, command: list[str] | None = None,
            input: str | None = None) -> CliResult:
    """Run `dstune ARGS`: in this process (nproc 1), as `nproc` ranks of the session's worker pool, or, with a
    `launcher` ("python": `python -m dstune`; "torchrun"; "deepspeed") or a `command`, in a new process."""
    if launcher is not None or command is not None:
        return in_subprocess(args, nproc, launcher or "python", cwd, timeout, env, command, input)
    if nproc == 1:
        return in_process(args, cwd, env, input)
    assert input is None, "pooled ranks read no stdin"
    return pooled(args, nproc, cwd, env, timeout)


def ok(res: CliResult) -> CliResult:
    assert res.returncode == 0, f"exit {res.returncode}\nSTDOUT:\n{res.stdout[-4000:]}\nSTDERR:\n{res.stderr[-6000:]}"
    return res


def read_metrics(run_dir: Path, split: str = "train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(FILLER + [rng.choice(words)] * 3) for _ in range(10))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- recipes over the workspace (conftest.py `ws`) ------------------------------------------------------

LM_STEPS = 6


def lm_recipe(ws, tmp_path, name: str, stage: int | None = None, methods: list | None = None,
              eval_fraction: float = 0.0, model: str = "gpt2", **training) -> str:
    """Tiny GPT-2 (or another of the workspace's tiny models) on packed text: every micro-batch has the same
    token count, so per-rank mean losses average to exactly the global mean."""
    ds = "zero0"
    if stage is not None:
        # threshold 0: partition even the tiny model's parameters under ZeRO-3
        cfg = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
        ds_path = tmp_path / f"zero{stage}.json"
        ds_path.write_text(json.dumps(cfg))
        ds = str(ds_path)
    t = {"precision": "fp32", "max_steps": LM_STEPS, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2,
         "seed": 7, **training}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({
        "task": "causal_lm", "model": {"path": str(ws / model)},
        "data": {"train": str(ws / "lm.jsonl"), "max_length": 32, "packing": True, "eval_fraction": eval_fraction},
        "deepspeed": ds, "training": t, "output_dir": str(tmp_path / name),
        "methods": methods or [{"name": "full"}]}))
    return str(path)


def random_tokens_recipe(tmp_path, precision: str = "bf16") -> str:
    """Tiny Llama on `data.train: random`: no tokenizer, no data file."""
    path = tmp_path / "random.yaml"
    path.write_text(f"""task: causal_lm
model:
  tiny: llama
  config_overrides: {{vocab_size: 300, max_position_embeddings: 64}}
data: {{train: random, max_length: 32}}
deepspeed: zero2
training: {{micro_batch_size: 2, precision: {precision}, lr: 1.0e-3}}
output_dir: {tmp_path / "unused"}
""")
    return str(path)


GOOD = {"task": "classification", "model": {"path": "MODEL"}, "tokenizer": {"path": "TOK"},
        "data": {"train": "DATA"}, "training": {"precision": "fp32", "max_steps": 2}, "output_dir": "OUT"}


def write(tmp_path, ws, text: str | None = None, **changes) -> tuple:
    """A recipe (YAML text, or GOOD with `changes`, `a__b=value` setting a.b) over the workspace's BERT,
    tokenizer and classification data: (recipe path, output_dir)."""
    if text is None:
        cfg = json.loads(json.dumps(GOOD))
        for key, value in changes.items():
            node = cfg
            *parents, leaf = key.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        text = json.dumps(cfg, indent=1)
    out = tmp_path / "out"
    text = (text.replace("MODEL", str(ws / "bert")).replace("TOK", str(ws / "tokenizer"))
            .replace("DATA", str(ws / "cls_train.jsonl")).replace("OUT", str(out)))
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path, out


def assert_user_error(res: CliResult, pattern: str, out) -> None:
    """Exit 2, one `dstune: error:` line matching `pattern`, no traceback, and no output_dir left behind."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("dstune: error:")]
    assert len(errors) == 1, res.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert not out.exists(), "a failed run left its output_dir behind"


# --- small models ---------------------------------------------------------------------------------------

def logits(model, task=None) -> torch.Tensor:
    """The model's logits on a fixed random batch of 2 x 10 token ids."""
    ids = torch.randint(4, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# --- tiny models of every family (dstune/families.py), with methods applied ---------------------------------

SPECIAL = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
# every decoder family as a causal LM; BERT as a classifier (T5: tests/test_tasks.py, test_export.py)
MODEL_FAMILIES = {**{f: ("causal_lm", T.AutoModelForCausalLM) for f in SPECS if f not in ("bert", "t5")},
            "bert": ("classification", T.AutoModelForSequenceClassification)}


def tiny(family: str) -> tuple[torch.nn.Module, str]:
    task, auto = MODEL_FAMILIES[family]
    torch.manual_seed(0)
    cfg = tiny_config(family, 100, SPECIAL)
    if task == "classification":
        cfg.num_labels = 3
    return auto.from_config(cfg).eval(), task


def with_methods(family: str, *specs: dict) -> tuple[torch.nn.Module, str]:
    model, task, _ = with_methods_list(family, *specs)
    return model, task


def with_methods_list(family: str, *specs: dict):
    model, task = tiny(family)
    methods = build_methods(list(specs))
    apply_methods(model, methods, task)
    return model, task, methods


def batch(task: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 100, (2, 12), generator=g)
    labels = torch.tensor([0, 2]) if task == "classification" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def float64_attention(q, k, v, pk, pv, pad=None, causal=True, bias=None):
    """Written out per query with explicit softmax, in float64; shares no code with the kernel."""
    q, k, v, pk, pv = (t.double() for t in (q, k, v, pk, pv))
    B, Hq, S, D = q.shape
    Hkv, P, T = pk.shape[0], pk.shape[1], k.shape[2]
    out = torch.zeros(B, S, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            keys = torch.cat([pk[g], k[b, g]])
            vals = torch.cat([pv[g], v[b, g]])
            for i in range(S):
                pos = T - S + i  # query i sits at key position pos (bottom-right alignment)
                scores = keys @ q[b, h, i] / math.sqrt(D)
                if bias is not None:
                    scores[P:] += bias[0, h, i].double()
                allowed = torch.ones(P + T, dtype=torch.bool)
                if causal:
                    allowed[P + pos + 1:] = False
                if pad is not None:
                    allowed[P:] &= pad[b]
                scores[~allowed] = -math.inf
                out[b, i, h] = torch.softmax(scores, 0) @ vals
    return out


def inputs(B=2, Hq=4, Hkv=2, S=7, T=None, P=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = T or S
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(B, Hq, S, D), r(B, Hkv, T, D), r(B, Hkv, T, D), r(Hkv, P, D), r(Hkv, P, D)
