"""Write the chatterbot English dialogues (PyPI package `chatterbot-corpus`) in every chat format dstune reads.

    python examples/chat_data.py [--out data]

writes, from the same dialogues (the bot speaks every second line):
  chat_messages.jsonl   {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
  chat_sharegpt.jsonl   {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]}
  chat_alpaca.jsonl     {"instruction": ..., "input": "", "output": ...}   (each user line and its reply)
  chat_pairs.jsonl      {"prompt": ..., "response": ...}                    (the same pairs)
Train on any of them with the matching recipe (`recipes/chat_*_smollm2.yaml`, `recipes/causal_lm_smollm2.yaml`).
"""
from __future__ import annotations

import argparse
import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import yaml

SHAREGPT = {"user": "human", "assistant": "gpt"}


def dialogues() -> list[list[str]]:
    """Every dialogue of the corpus with at least one reply, as its lines in order."""
    try:
        root = Path(distribution("chatterbot-corpus").locate_file("chatterbot_corpus/data/english"))
    except PackageNotFoundError:
        raise SystemExit("chat_data: the PyPI package chatterbot-corpus is not installed (run `make demo`)")
    out = []
    for f in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            lines = [str(x).strip() for x in conv if str(x).strip()]
            if len(lines) >= 2:
                out.append(lines[:len(lines) // 2 * 2])  # end on the bot's line
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data", help="folder for the jsonl files")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    convs = [[{"role": "user" if i % 2 == 0 else "assistant", "content": line} for i, line in enumerate(d)]
             for d in dialogues()]
    pairs = [(c[i]["content"], c[i + 1]["content"]) for c in convs for i in range(0, len(c), 2)]
    files = {
        "chat_messages.jsonl": [{"messages": c} for c in convs],
        "chat_sharegpt.jsonl": [{"conversations": [{"from": SHAREGPT[t["role"]], "value": t["content"]} for t in c]}
                                for c in convs],
        "chat_alpaca.jsonl": [{"instruction": p, "input": "", "output": r} for p, r in pairs],
        "chat_pairs.jsonl": [{"prompt": p, "response": r} for p, r in pairs],
    }
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
