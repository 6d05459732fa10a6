"""training.nan_policy=skip: a step whose loss is not finite leaves the weights as they were, and training goes on."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import ok, read_metrics, run_cli


def poisoned(ws, tmp_path) -> tuple:
    """The tiny BERT with one token's embedding row set to NaN, and 32 rows of which only one holds that token:
    the step that draws it has a NaN loss (and NaN gradients), every other step is finite."""
    import transformers as T

    from dstune.models.tokenizers import load_tokenizer

    tok = load_tokenizer(str(ws / "tokenizer"))
    rows = [json.loads(line) for line in (ws / "cls_train.jsonl").read_text().splitlines()][:31]
    used = {i for r in rows for i in tok(r["text"])["input_ids"]}
    for piece_id in sorted(set(range(len(tok))) - used - set(tok.all_special_ids)):
        text = f"{rows[0]['text']} {tok.decode([piece_id])}"
        if piece_id in tok(text)["input_ids"]:
            break
    rows.insert(11, {"text": text, "label": rows[0]["label"]})
    data = tmp_path / "poisoned.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = T.AutoModelForSequenceClassification.from_pretrained(ws / "bert")
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[piece_id] = float("nan")
    model.save_pretrained(tmp_path / "bert_nan")
    return tmp_path / "bert_nan", data


def module_state(ckpt_dir) -> dict:
    from dstune.engine.checkpoint import safe_load

    return safe_load(str(ckpt_dir / "mp_rank_00_model_states.pt"), map_location="cpu")["module"]


@pytest.mark.parametrize("stage, nproc, quantize", [(0, 1, None), (0, 1, "nf4"),
                                                    pytest.param(2, 2, None, marks=pytest.mark.slow),
                                                    pytest.param(3, 2, None, marks=pytest.mark.slow)])
def test_a_step_with_a_nan_loss_is_skipped_and_training_goes_on(ws, built_ops, tmp_path, stage, nproc, quantize):
    """(nf4: the same on a 4-bit base, whose LoRA alone trains.)"""
    model, data = poisoned(ws, tmp_path)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}))
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "task": "classification", "model": {"path": str(model), "quantize": quantize},
        "tokenizer": {"path": str(ws / "tokenizer")},
        "data": {"train": str(data)}, "deepspeed": str(ds), "methods": [{"name": "lora"}], "output_dir": str(out),
        "training": {"precision": "fp32", "micro_batch_size": 4 // nproc, "epochs": 1, "lr": 1e-2, "checkpoint_every": 1,
                     "keep_checkpoints": 8, "nan_policy": "skip"}}))
    ok(run_cli(["train", str(recipe)], nproc=nproc))

    train = read_metrics(out)
    assert sorted(train) == list(range(1, 9))
    skipped = [s for s, r in train.items() if r.get("skipped")]
    assert len(skipped) == 1 and "loss" not in train[skipped[0]], train
    assert json.loads((out / "results.json").read_text())["skipped_steps"] == 1
    s = skipped[0]
    ckpt = out / "checkpoints"
    if stage < 3:  # ZeRO-3 keeps the module's partitions in the optimizer-state files
        before = module_state(ckpt / f"step_{s - 1:08d}") if s > 1 else None
        at, after = module_state(ckpt / f"step_{s:08d}"), module_state(ckpt / f"step_{s + 1:08d}")
        assert at and all(torch.isfinite(v).all() for v in at.values())
        if before is not None:  # the skipped step changed nothing
            assert all(torch.equal(before[k], at[k]) for k in at)
        assert any(not torch.equal(at[k], after[k]) for k in at)  # the next one trained
    from safetensors.torch import load_file
    final = load_file(str(out / "trainable.safetensors"))
    assert final and all(torch.isfinite(v).all() for v in final.values())


def test_skip_stops_when_every_step_is_not_finite(ws, built_ops, tmp_path):
    from helpers import write

    path, out = write(tmp_path, ws, training__lr=1e30, training__max_steps=12, training__nan_policy="skip")
    res = run_cli(["train", str(path)])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "training: the loss is nan at step " in res.stderr and "(8 steps in a row)" in res.stderr, res.stderr
