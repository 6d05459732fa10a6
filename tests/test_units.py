"""Fast in-process checks of config parsing, data order, LR schedule and DeepSpeed configs."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from dstune.config import load_config, parse_overrides
from dstune.data.batching import StepBatches, collate
from dstune.engine.ds_config import DS_CONFIG_DIR, build_ds_config, named_configs
from dstune.engine.trainer import lr_lambda
from dstune.errors import UserError
from dstune.tasks import get_task

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_overrides_parse_yaml_values_into_nested_keys():
    assert parse_overrides(["training.lr=1e-4", "training.resume=false", "deepspeed=zero3",
                            "methods=[{name: full}]"]) == {
        "training": {"lr": 1e-4, "resume": False}, "deepspeed": "zero3", "methods": [{"name": "full"}]}


def test_one_rank_with_accumulation_sees_the_examples_of_two_ranks():
    one = StepBatches(100, micro=4, accum=2, world=1, rank=0, seed=3)
    two = [StepBatches(100, micro=4, accum=1, world=2, rank=r, seed=3) for r in (0, 1)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 12  # 100 // 8, tail dropped
    for step in range(30):  # crosses epoch boundaries
        assert one.for_step(step) == [b for s in two for b in s.for_step(step)]


def test_each_epoch_is_a_new_permutation_and_covers_distinct_examples():
    b = StepBatches(64, micro=8, accum=1, world=1, rank=0, seed=0)
    epoch0 = [i for s in range(8) for i in b.for_step(s)[0]]
    epoch1 = [i for s in range(8, 16) for i in b.for_step(s)[0]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(64))
    assert epoch0 != epoch1
    assert StepBatches(64, 8, 1, 1, 0, seed=0).for_step(9) == b.for_step(9)  # a pure function of the step


def test_every_task_the_config_accepts_has_a_module():
    from dstune.config import RunConfig
    from dstune.tasks import TASKS
    from dstune.tasks.base import Task
    accepted = RunConfig.model_json_schema()["properties"]["task"]["enum"]
    assert accepted == list(TASKS)
    for name in TASKS:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name


def test_collate_pads_inputs_and_masks_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0, get_task("causal_lm"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660949]),
])
def test_lr_schedule_warms_up_then_decays(schedule, expected):
    f = lr_lambda(schedule, warmup=2, total=6)
    assert [f(s) for s in range(6)] == pytest.approx(expected)


def test_each_step_logs_the_learning_rate_its_update_used(ws, tmp_path):
    """lm_recipe warms up over 2 steps to 3e-3, then decays linearly to 0 at step 4: the rates the 4 updates
    used (the schedule moves after each update; the next step's rate is not logged as this one's)."""
    from helpers import lm_recipe, ok, read_metrics, run_cli
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "run", max_steps=4)]))
    logged = [row["lr"] for _, row in sorted(read_metrics(tmp_path / "run").items())]
    assert logged == pytest.approx([1.5e-3, 3e-3, 3e-3, 1.5e-3])


def test_every_ds_config_is_accepted_by_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig
    assert named_configs() == ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
    for name in named_configs():
        raw = json.loads((DS_CONFIG_DIR / f"{name}.json").read_text())
        assert DeepSpeedConfig(raw).zero_optimization_stage == int(name[4])


def test_recipe_values_fill_the_deepspeed_config(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: causal_lm\nmodel: {tiny: gpt2}\ndata: {train: x.jsonl}\noutput_dir: o\n"
                      "deepspeed: zero2\ntraining: {micro_batch_size: 3, gradient_accumulation_steps: 2, "
                      "precision: bf16, lr: 0.01, max_grad_norm: 0.5}\n")
    ds = build_ds_config(load_config(recipe), world_size=4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 0.01 and ds["zero_optimization"]["stage"] == 2


def test_invalid_deepspeed_json_names_file_and_line(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: causal_lm\nmodel: {{tiny: gpt2}}\ndata: {{train: x}}\noutput_dir: o\ndeepspeed: {bad}\n")
    with pytest.raises(UserError, match=r"ds\.json:2: deepspeed: invalid JSON"):
        build_ds_config(load_config(recipe), 1)


def test_model_needs_exactly_one_source(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: causal_lm\nmodel: {}\ndata: {train: x}\noutput_dir: o\n")
    with pytest.raises(UserError, match=r"r\.yaml:2: model: .*exactly one of model\.path and model\.tiny"):
        load_config(recipe)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_example_recipes_validate(recipe):
    from dstune.tasks import TASKS
    cfg = load_config(recipe)
    assert cfg.task in TASKS


def test_methods_command_lists_every_method_with_its_options():
    from helpers import ok, run_cli
    out = ok(run_cli(["methods"])).stdout
    for name in ("full", "freeze", "layerwise_lr", "bitfit", "prompt", "prefix", "adapter", "lora", "ia3"):
        assert f"\n{name} " in f"\n{out}", name
    assert "    r: rank of the update (default: 8)" in out
    assert "    num_virtual_tokens: P: prefix keys/values per layer (default: 16)" in out


def _recipe(tmp_path, task: str, train: Path, **data) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"task": task, "model": {"tiny": "gpt2"}, "data": {"train": str(train), **data},
                                  "output_dir": str(tmp_path / "o")}))
    return recipe


def test_chat_prompts_use_the_template_and_are_masked_from_the_loss(ws, tmp_path):
    from dstune.data.batching import IGNORE
    from dstune.prepare.pipeline import prepare_data
    from dstune.models.tokenizers import load_tokenizer
    tok = load_tokenizer(str(ws / "tokenizer"))
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"  # words it knows
                         "{% if add_generation_prompt %}assistant{% endif %}")
    data = prepare_data(load_config(_recipe(tmp_path, "causal_lm", ws / "chat.jsonl")), tok)
    row, first = data.train[0], json.loads((ws / "chat.jsonl").read_text().splitlines()[0])
    n_prompt = sum(1 for t in row["labels"] if t == IGNORE)
    assert row["labels"][:n_prompt] == [IGNORE] * n_prompt  # the prompt first, all context
    assert tok.decode(row["input_ids"][:n_prompt]).split() == ["user", *first["prompt"].split(), "assistant"]
    reply = row["input_ids"][n_prompt:]
    assert row["labels"][n_prompt:] == reply and tok.decode(reply).split() == first["response"].split()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "saved"])
def test_csv_parquet_and_saved_datasets_load_like_jsonl(ws, tmp_path, fmt):
    import datasets
    from dstune.data.files import load_table
    rows = datasets.load_dataset("json", data_files=str(ws / "cls_train.jsonl"), split="train")
    path = tmp_path / f"train.{fmt}"
    {"csv": rows.to_csv, "parquet": rows.to_parquet, "saved": rows.save_to_disk}[fmt](str(path))
    loaded = load_table(str(path), "data.train")
    assert loaded["text"] == rows["text"] and loaded["label"] == rows["label"]


def test_packing_keeps_whole_documents_with_their_own_positions(ws, tmp_path):
    from dstune.prepare.pipeline import prepare_data
    from dstune.models.tokenizers import load_tokenizer
    tok = load_tokenizer(str(ws / "tokenizer"))
    cfg = load_config(_recipe(tmp_path, "causal_lm", ws / "lm.jsonl", packing=True, max_length=32))
    data = prepare_data(cfg, tok)
    docs = [tok(json.loads(line)["text"])["input_ids"] for line in (ws / "lm.jsonl").read_text().splitlines()]
    docs = [d if d[-1] == tok.eos_token_id else d + [tok.eos_token_id] for d in docs]
    assert max(map(len, docs)) <= 32  # so no document is cut
    blocks = list(data.train)
    assert all(len(b["input_ids"]) <= 32 for b in blocks)
    # every document whole and numbered from 0; its first token is a target only at a block's start
    pieces = sorted(tuple(b["input_ids"][i:j]) for b in blocks
                    for i, j in _spans(b["position_ids"]))
    assert pieces == sorted(tuple(d) for d in docs)
    firsts = [b["labels"][i] for b in blocks for i, _ in _spans(b["position_ids"]) if i > 0]
    assert firsts and set(firsts) == {-100}
    shortest = sorted(len(b["input_ids"]) for b in blocks)[:2]
    assert sum(shortest) > 32  # no two blocks would fit into one


def _spans(positions: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return list(zip(starts, starts[1:]))


def test_sentencepiece_tokenizer_encodes_and_decodes_as_sentencepiece_does(ws):
    """The HF tokenizer dstune wraps around a .model file (transformers 5.23 dropped the Metaspace
    pre-tokenizer here and split every text's first word into characters)."""
    import sentencepiece as spm
    from dstune.models.tokenizers import load_tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(ws / "tokenizer" / "tokenizer.model"))
    texts = (ws / "corpus.txt").read_text().splitlines()[:20] + ["the movie was good", "  a  clever plot "]
    for tok in (load_tokenizer(str(ws / "tokenizer")), load_tokenizer(str(ws / "tokenizer" / "tokenizer.model"))):
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert ids == sp.encode(text), text
            assert tok.decode(ids) == sp.decode(ids), text


def _random_data(tmp_path, *, task: str = "causal_lm", extra: str = "", overrides: str = "{vocab_size: 50}"):
    from dstune.prepare.pipeline import prepare_data
    path = tmp_path / "random.yaml"
    path.write_text(f"task: {task}\nmodel: {{tiny: llama, config_overrides: {overrides}}}\n"
                    f"data: {{train: random, max_length: 12{extra}}}\noutput_dir: {tmp_path / 'run'}\n")
    return prepare_data(load_config(path), None)


def test_random_token_data_is_full_blocks_below_the_vocabulary_and_repeatable(tmp_path):
    data = _random_data(tmp_path)
    rows = [data.train[i] for i in (0, 1, len(data.train) - 1)]
    assert all(len(r["input_ids"]) == 12 and r["labels"] == r["input_ids"] for r in rows)
    assert all(0 <= t < 50 for r in rows for t in r["input_ids"])
    assert rows[0]["input_ids"] != rows[1]["input_ids"]  # fresh ids per row
    assert _random_data(tmp_path).train[1] == rows[1]     # and the same ids for the same (seed, row)
    with pytest.raises(IndexError):
        data.train[len(data.train)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="seq2seq"), "data.train: `random` data is for causal_lm, not seq2seq"),
    (dict(extra=", eval_fraction: 0.1"), "data.eval: random data has nothing to evaluate on"),
    (dict(overrides="{}"), "model.config_overrides.vocab_size: needed (an int >= 2) for random data"),
])
def test_random_token_data_refuses_what_it_cannot_be(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        _random_data(tmp_path, **kwargs)


def test_tiny_config_overrides_reach_derived_fields():
    from dstune.families import tiny_config
    config = tiny_config("llama", 100, {}, {"hidden_size": 256, "num_attention_heads": 4})
    assert config.head_dim == 64  # set after construction, head_dim would stay 32 / 4 = 8


def test_compile_needs_transformer_layers():
    import torch

    from dstune.models.loading import compile_layers
    with pytest.raises(UserError, match=r"training\.compile: found no transformer layers to compile in Sequential"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2)


def test_a_run_trained_on_random_tokens_has_no_text_to_load(tmp_path):
    from dstune.rundir.load import load_run
    for name in ("config.yaml", "run.json", "trainable.safetensors"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(UserError, match="trained on random token ids, it has no tokenizer to read or write text"):
        load_run(str(tmp_path))


@pytest.mark.parametrize("given,expected", [("9.0a", "9.0"), ("8.0;9.0a", "8.0;9.0"), ("8.0 9.0+PTX", "8.0 9.0+PTX"),
                                            ("10.0a;12.0f", "10.0;12.0"), ("8.6", "8.6")])
def test_arch_list_is_made_readable_for_deepspeed_op_builds(given, expected, monkeypatch):
    from dstune.engine.distributed import prepare_env
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "0")  # a launcher's: left alone
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    prepare_env()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected


def test_a_full_disk_says_so_in_one_line(monkeypatch, capsys):
    import errno

    import dstune.cli as cli

    def full(args):
        """A command that fills the disk."""
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/step_00000002/a.pt")

    monkeypatch.setattr(cli, "cmd_methods", full)
    assert cli.main(["methods"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dstune: error: no space left on the device writing /runs/x/checkpoints/step_00000002/a.pt;")
    assert "\n" not in err


@pytest.mark.parametrize("ds, message", [
    ({"zero_optimization": {"stage": "two"}}, r"deepspeed: zero_optimization\.stage must be 0-3, got 'two'"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}},
     r"deepspeed: zero_optimization\.reduce_bucket_size: .* \(got 'big'\)"),
    ({"zero_optimization": 3}, r"deepspeed: zero_optimization must be a mapping such as \{\"stage\": 2\}, got 3"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, r"deepspeed: zero_optimization\.overlap_com: unknown key"),
    ({"zero_optimization": {"stage": 7}}, r"deepspeed: zero_optimization\.stage must be 0-3, got 7"),
    ({"optimizer": {"type": "Adamm"}}, r"deepspeed: optimizer\.type 'Adamm' is neither a DeepSpeed optimizer"),
    ({"zero_optimisation": {"stage": 3}}, r"deepspeed: unknown key 'zero_optimisation' \(did you mean "
                                          r"'zero_optimization'\?\); DeepSpeed would ignore it"),
    ({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e9}, "optimizer": {"type": "SGD"}}, None),
    ({"activation_checkpointing": {}, "flops_profiler": {"enabled": False}, "aio": {}, "autotuning": {},
      "wandb": {"enabled": False}, "tensorboard": {"enabled": False}, "communication_data_type": "fp32",
      "zero_allow_untested_optimizer": True, "data_efficiency": {}, "scheduler": {"type": "WarmupLR"}}, None),
])
def test_deepspeed_sections_deepspeed_would_reject_are_named_up_front(tmp_path, ds, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: causal_lm\nmodel: {{tiny: gpt2}}\ndata: {{train: random}}\noutput_dir: o\n"
                      f"deepspeed: {json.dumps(ds)}\n")
    if message is None:  # the control: a valid config passes
        build_ds_config(load_config(recipe), world_size=1)
        return
    with pytest.raises(UserError, match=message):
        build_ds_config(load_config(recipe), world_size=1)


def test_precision_auto_takes_what_the_machine_runs_fast_and_slow_choices_are_warned(monkeypatch):
    import dstune.engine.precision as P
    monkeypatch.setattr(P, "cpu_bf16", lambda: None)        # an AVX2-only CPU
    assert P.resolve("auto", cuda=False) == ("fp32", "auto: the CPU has no native bf16")
    assert "AVX512-BF16 or AMX" in P.slow_warning("bf16", cuda=False)
    assert "emulated" in P.slow_warning("fp16", cuda=False) and P.slow_warning("fp32", cuda=False) is None
    monkeypatch.setattr(P, "cpu_bf16", lambda: "amx_bf16")  # a CPU with AMX: measured (tests/test_cpu_probe.py)
    monkeypatch.setenv("DSTUNE_CPU_PRECISION", "bf16")      # and here pinned
    assert P.resolve("auto", cuda=False) == ("bf16", "auto: DSTUNE_CPU_PRECISION=bf16")
    assert P.slow_warning("bf16", cuda=False) is None
    assert P.resolve("auto", cuda=True)[0] == "bf16"         # what `dstune estimate` assumes for a GPU
    assert P.resolve("fp16", cuda=True) == ("fp16", "set in the recipe")


def test_this_machines_cpu_flags_are_read():
    from dstune.engine.precision import cpu_bf16
    flags = open("/proc/cpuinfo").read()
    assert (cpu_bf16() is not None) == any(f" {f}" in flags for f in ("avx512_bf16", "amx_bf16"))
