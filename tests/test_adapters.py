"""Many adapters, one base: each adapter of a job trains exactly as a run of its own on the same data and seed
(its losses and its trained weights), whatever else shares the base, the batch and the optimizer."""
from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from helpers import assert_user_error, ok, read_metrics, run_cli, write

TOL = 1e-5

# every method that leaves the base frozen, with settings that differ per adapter: lr, schedule, steps, rows
# per micro-batch, clipping (small enough to clip), a held-out split
LM_ADAPTERS = [
    {"name": "lora", "methods": [{"name": "lora", "r": 4}], "training": {"lr": 3e-3, "max_grad_norm": 0.05}},
    {"name": "dora-prompt", "methods": [{"name": "prompt", "num_virtual_tokens": 3},
                                        {"name": "lora", "r": 2, "use_dora": True}],
     "training": {"lr": 1e-2, "micro_batch_size": 1, "lr_schedule": "cosine"}},
    {"name": "ia3", "methods": [{"name": "ia3"}], "training": {"lr": 3e-2, "max_steps": 3, "weight_decay": 0.1}},
    {"name": "adapter", "methods": [{"name": "adapter", "bottleneck": 8}], "data": {"eval_fraction": 0.2},
     "evaluation": {"every": 2}},
    {"name": "prefix", "methods": [{"name": "prefix", "num_virtual_tokens": 2}], "training": {"lr": 1e-2}},
]


def lm_job(ws, tmp_path, adapters: list[dict], stage: int | None = None, **training) -> tuple:
    ds = "zero0"
    if stage is not None:
        ds_path = tmp_path / f"zero{stage}.json"
        ds_path.write_text(json.dumps({"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}))
        ds = str(ds_path)
    out = tmp_path / "job"
    recipe = tmp_path / "job.yaml"
    recipe.write_text(json.dumps({
        "task": "causal_lm", "model": {"path": str(ws / "gpt2")},
        "data": {"train": str(ws / "lm.jsonl"), "max_length": 32, "packing": True},
        "deepspeed": ds, "output_dir": str(out), "methods": [{"name": "lora"}], "adapters": adapters,
        "training": {"precision": "fp32", "max_steps": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1,
                     "seed": 7, **training}}))
    return recipe, out


def solo(run_dir, tmp_path, nproc: int = 1):
    """The adapter's own recipe (its run dir's config.yaml) trained as a job of its own."""
    out = tmp_path / f"solo-{run_dir.name}"
    ok(run_cli(["train", str(run_dir / "config.yaml"), f"output_dir={out}"], nproc=nproc))
    return out


def assert_same_run(adapter_dir, solo_dir) -> None:
    mine, alone = read_metrics(adapter_dir), read_metrics(solo_dir)
    assert sorted(mine) == sorted(alone), (adapter_dir.name, sorted(mine), sorted(alone))
    for step in alone:
        assert abs(mine[step]["loss"] - alone[step]["loss"]) < TOL, (adapter_dir.name, step, mine[step], alone[step])
        assert mine[step]["lr"] == pytest.approx(alone[step]["lr"], rel=1e-9), (adapter_dir.name, step)
    a, b = load_file(adapter_dir / "trainable.safetensors"), load_file(solo_dir / "trainable.safetensors")
    assert a.keys() == b.keys(), (adapter_dir.name, sorted(a.keys() ^ b.keys())[:4])
    for k in a:
        assert (a[k] - b[k]).abs().max() < TOL, (adapter_dir.name, k)
    if (solo_dir / "metrics.jsonl").read_text().count('"eval"'):
        ev, ev_alone = read_metrics(adapter_dir, "eval"), read_metrics(solo_dir, "eval")
        assert sorted(ev) == sorted(ev_alone)
        for step in ev:
            assert ev[step]["loss"] == pytest.approx(ev_alone[step]["loss"], abs=TOL)


def test_each_adapter_of_a_job_trains_as_a_run_of_its_own(ws, built_ops, tmp_path):
    recipe, out = lm_job(ws, tmp_path, LM_ADAPTERS)
    res = ok(run_cli(["train", str(recipe)]))
    assert "5 adapters over one base" in res.stdout
    for spec in LM_ADAPTERS:
        assert_same_run(out / "adapters" / spec["name"], solo(out / "adapters" / spec["name"], tmp_path))
    summary = json.loads((out / "results.json").read_text())
    assert summary["steps"] == 4 and summary["adapters"]["ia3"]["steps"] == 3
    assert "after" in summary["adapters"]["adapter"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_adapters_on_two_ranks_train_as_their_own_runs_through_a_resume(ws, built_ops, tmp_path, stage):
    """2 ranks, ZeRO-2/3: the job stops at step 2 and resumes; each adapter's steps equal its own 2-rank run."""
    adapters = [LM_ADAPTERS[0], {**LM_ADAPTERS[2], "training": {"lr": 3e-2, "weight_decay": 0.1}},
                {**LM_ADAPTERS[4], "training": {"lr": 1e-2, "micro_batch_size": 1}}]
    recipe, out = lm_job(ws, tmp_path, adapters, stage, checkpoint_every=2)
    ok(run_cli(["train", str(recipe), "training.max_steps=2"], nproc=2))
    res = ok(run_cli(["train", str(recipe)], nproc=2))
    assert "resumed from step_00000002 (step 2)" in res.stdout
    for spec in adapters:
        run_dir = out / "adapters" / spec["name"]
        assert_same_run(run_dir, solo(run_dir, tmp_path, nproc=2))


def test_classification_adapters_each_train_their_own_head(ws, built_ops, tmp_path):
    """Two adapters of a BERT classifier: each has its own copy of the head, saved under the head's names."""
    adapters = [{"name": "r4", "methods": [{"name": "lora", "r": 4, "target_modules": "all-linear"}],
                 "training": {"lr": 1e-2}},
                {"name": "ia3", "methods": [{"name": "ia3"}], "training": {"lr": 3e-2, "micro_batch_size": 2}},
                {"name": "r2", "methods": [{"name": "lora", "r": 2, "target_modules": "all-linear"}]}]
    path, out = write(tmp_path, ws, training={"precision": "fp32", "max_steps": 3, "micro_batch_size": 4},
                      adapters=adapters, data={"train": "DATA", "eval_fraction": 0.25})
    ok(run_cli(["train", str(path)]))
    for spec in adapters:
        run_dir = out / "adapters" / spec["name"]
        assert "classifier.weight" in load_file(run_dir / "trainable.safetensors")
        assert_same_run(run_dir, solo(run_dir, tmp_path))
        res = ok(run_cli(["eval", str(run_dir)]))  # a complete run dir: every command takes it
        assert "accuracy" in res.stdout


@pytest.mark.parametrize("adapters, pattern", [
    ([{"name": "a"}, {"name": "a"}], r"adapters: the name 'a' is given twice"),
    ([{"name": "a", "methods": [{"name": "full"}]}], r"adapters \(a\): full changes the base's own weights"),
    ([{"name": "a", "methods": [{"name": "bitfit"}]}], r"adapters \(a\): bitfit changes the base's own weights"),
    ([{"name": "a", "deepspeed": "zero2"}], r"adapters.0: deepspeed: shared by every adapter"),
    ([{"name": "a", "training": {"precision": "bf16"}}], r"training.precision: shared by every adapter"),
    ([{"name": "a", "training": {"lrr": 1}}], r"training.lrr: unknown key \(did you mean 'lr'\?\)"),
    ([{"name": "a", "methods": [{"name": "lora", "rr": 2}]}], r"adapters\[0\] \(a\)\.methods\[0\] \(lora\)\.rr"),
    ([{"name": "a/b"}], r"adapters.0.name"),
    ([{"name": "a.b"}], r"adapters.0.name: 'a.b': an adapter's name is its run dir's: letters, digits, _ and -"),
    ([{"nmae": "a"}], r"adapters.0: nmae: unknown key \(did you mean 'name'\?\)"),
    ([{"name": "a", "data": {"trian": "x"}}], r"data.trian: unknown key \(did you mean 'train'\?\)"),
    ([{"name": "a", "methods": [{"name": "adapter", "train_norms": True}]}],
     r"adapter changes the base's own weights with these options"),
    ([{"name": "a", "data": {"train": "/nonexistent.jsonl"}}], r"adapters\[0\] \(a\): data.train: .*not found"),
    ([{"name": "a", "task": "seq2seq"}, {"name": "b"}],
     r"adapters: tasks classification, seq2seq in one job; adapters of different"),
    ([{"name": "a", "task": "causal_lm"}, {"name": "b"}],
     r"task: classification, but adapters of different tasks share a causal LM's base: set task: causal_lm"),
    ([{"name": "a", "methods": []}], r"adapters\[0\] \(a\)\.methods: list at least one tuning method \(or give"),
])
def test_bad_adapters_are_refused_in_one_line(ws, tmp_path, adapters, pattern):
    path, out = write(tmp_path, ws, adapters=adapters, methods=[{"name": "lora"}])
    assert_user_error(run_cli(["train", str(path)]), pattern, out)


@pytest.mark.parametrize("changes, pattern", [
    ({"shared_methods": [{"name": "lora"}], "adapters": None}, r"shared_methods: methods shared by the adapters"),
    ({"shared_methods": []}, r"shared_methods: list at least one method"),
    ({"shared_methods": [{"name": "full"}]}, r"shared_methods: full changes the base's own weights"),
    ({"shared_methods": [{"name": "lora", "rr": 2}]}, r"shared_methods\[0\] \(lora\)\.rr: unknown option"),
    ({"shared_methods": [{"name": "lora"}], "methods": [{"name": "ia3"}]}, r"methods: unused with shared_methods"),
    ({"shared_methods": [{"name": "lora"}], "adapters": [{"name": "a", "methods": [{"name": "lora", "r": 2}]}]},
     r"adapters\[0\] \(a\)\.methods: lora is one of the shared_methods already"),
])
def test_bad_shared_methods_are_refused_in_one_line(ws, tmp_path, changes, pattern):
    path, out = write(tmp_path, ws, **{"adapters": [{"name": "a", "methods": [{"name": "ia3"}]}], **changes})
    assert_user_error(run_cli(["train", str(path)]), pattern, out)


def test_adapter_run_dirs_hold_the_recipe_of_a_run_of_their_own(ws, tmp_path):
    path, _ = write(tmp_path, ws, methods=[{"name": "lora"}], training={"lr": 1e-3, "max_steps": 2},
                    adapters=[{"name": "x", "training": {"lr": 5e-3}}, {"name": "y", "methods": [{"name": "ia3"}]}])
    from dstune.config import load_config

    runs = dict(load_config(path).adapter_runs())
    assert runs["x"].training.lr == 5e-3 and runs["x"].methods == [{"name": "lora"}]
    assert runs["y"].training.lr == 1e-3 and runs["y"].methods == [{"name": "ia3"}]
    assert runs["y"].output_dir.endswith("out/adapters/y") and runs["y"].adapters is None
    assert yaml.safe_dump(runs["x"].model_dump(mode="json"))  # writable as a run dir's config.yaml


def test_rows_of_several_adapters_in_one_forward_compute_as_each_alone():
    """Row-local adapters (LoRA, DoRA, IA3, bottleneck adapters) share one forward, each over its own rows,
    with one call of each base layer; soft prompts and prefixes are routed one adapter per forward."""
    import torch

    from dstune.config import config_from_dict
    from dstune.methods import AdapterSpec, apply_adapter_methods, build_methods
    from dstune.methods.routing import draws_dropout, route, route_rows, row_local
    from dstune.models.loading import load_model

    cfg = config_from_dict({"task": "causal_lm", "model": {"tiny": "llama", "config_overrides": {"vocab_size": 64}},
                            "data": {"train": "random", "max_length": 16}, "output_dir": "unused"})
    torch.manual_seed(0)
    model = load_model(cfg, None, None, torch.device("cpu"))
    specs = {"lora": [{"name": "lora", "r": 4}], "dora": [{"name": "lora", "r": 2, "use_dora": True}],
             "ia3": [{"name": "ia3"}], "adapter": [{"name": "adapter", "bottleneck": 8}],
             "prompt": [{"name": "prompt", "num_virtual_tokens": 2}]}
    apply_adapter_methods(model, {k: AdapterSpec(build_methods(v), "causal_lm") for k, v in specs.items()}, [],
                          "causal_lm", 0)
    with torch.no_grad():  # trained-looking weights: no adapter is the identity
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    assert [row_local(model, k) for k in specs] == [True, True, True, True, False]
    ids = torch.randint(0, 64, (7, 5), generator=torch.Generator().manual_seed(1))
    segments = [("lora", 0, 2), ("dora", 2, 3), ("ia3", 3, 5), ("adapter", 5, 7)]
    calls = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    with route_rows(model, segments):
        shared = model(input_ids=ids).logits
    assert calls == [7]  # the base layer ran once, over every adapter's rows
    hook.remove()
    for name, s, e in segments:
        with route(model, name):
            alone = model(input_ids=ids[s:e]).logits
        assert (shared[s:e] - alone).abs().max() < 1e-5, name
    assert not draws_dropout(model)  # so row-local adapters may share a forward
    model.config.attention_dropout = 0.1
    assert draws_dropout(model)  # then each adapter draws its masks in a forward of its own
    with route(model, "lora"):  # the rows of another adapter are not what LoRA computes for them
        other = model(input_ids=ids[2:3]).logits
    assert (other - shared[2:3]).abs().max() > 1e-3


def test_a_sweep_trains_its_grid_in_one_job_and_ranks_it(ws, built_ops, tmp_path):
    path, out = write(tmp_path, ws, methods=[{"name": "lora", "r": 4}], data={"train": "DATA", "eval_fraction": 0.25},
                      training={"precision": "fp32", "max_steps": 4, "micro_batch_size": 4, "lr": 1e-3},
                      evaluation={"every": 2})
    res = ok(run_cli(["sweep", str(path), "--grid", "training.lr=1e-3,3e-2", "methods[0].r=2,4"]))
    names = ["lr1e-3_r2", "lr1e-3_r4", "lr3e-2_r2", "lr3e-2_r4"]
    assert "4 adapters over one base" in res.stdout and "sweep of 4 settings" in res.stdout
    table = (out / "sweep.md").read_text()
    rows = table.splitlines()[2:]
    assert sorted(r.split("|")[2].strip() for r in rows) == names and "(best)" in rows[0]
    scores = [float(r.split("|")[3]) for r in rows]
    assert scores == sorted(scores, reverse=True)  # accuracy: higher first
    for name, score in zip((r.split("|")[2].strip() for r in rows), scores):
        results = json.loads((out / "adapters" / name / "results.json").read_text())
        assert results["after"]["accuracy"] == pytest.approx(score, abs=1e-4)
        cfg = yaml.safe_load((out / "adapters" / name / "config.yaml").read_text())
        assert cfg["training"]["lr"] == float(name[2:].split("_")[0].replace("p", "."))
        assert cfg["methods"] == [{"name": "lora", "r": int(name.rsplit("_r", 1)[1])}]
    assert (out / "sweep.png").stat().st_size > 10_000


@pytest.mark.parametrize("grid, pattern", [
    (["training.lrr=1,2"], r"--grid training.lrr: unknown key \(did you mean 'lr'\?\)"),
    (["training.seed=1,2"], r"--grid training.seed: shared by every adapter"),
    (["methods[0].rank=2,4"], r"--grid methods\[0\].rank: lora has no option 'rank'"),
    (["methods[1].r=2,4"], r"--grid methods\[1\].r: the recipe lists 1 method"),
    (["model.path=a,b"], r"--grid model.path: a sweep varies training"),
    (["training.lr=1,1"], r"a value is listed twice"),
    (["training.lr"], r"expected key=value,value"),
])
def test_bad_grids_are_refused_in_one_line(ws, tmp_path, grid, pattern):
    path, out = write(tmp_path, ws, methods=[{"name": "lora"}], data={"train": "DATA", "eval_fraction": 0.25})
    assert_user_error(run_cli(["sweep", str(path), "--grid", *grid]), pattern, out)


def test_a_sweep_needs_held_out_rows(ws, tmp_path):
    path, out = write(tmp_path, ws, methods=[{"name": "lora"}])
    res = run_cli(["sweep", str(path), "--grid", "training.lr=1e-3,1e-2"])
    assert_user_error(res, r"data.eval: a sweep ranks", out)


@pytest.mark.parametrize("stage, world", [(None, 1), pytest.param(3, 2, marks=pytest.mark.slow)])
def test_estimate_counts_one_base_and_every_adapter(ws, built_ops, tmp_path, stage, world):
    """`dstune estimate` of a job: the base once and each adapter's parameters and optimizer state (its own
    param groups), equal to what the engine holds after the first step."""
    adapters = [{**LM_ADAPTERS[0], "training": {"lr": 3e-3, "weight_decay": 0.1}}, LM_ADAPTERS[2], LM_ADAPTERS[4]]
    recipe, out = lm_job(ws, tmp_path, adapters, stage, max_steps=1)
    ok(run_cli(["train", str(recipe)], nproc=world))
    measured = json.loads((out / "memory.json").read_text())["after_first_step"]
    predicted = json.loads(ok(run_cli(["estimate", str(recipe), "--world-size", str(world), "--cpu", "--json"])).stdout)
    for m, p in zip(measured, predicted, strict=True):
        assert m["weights"] == p["weights"] and m["optimizer_states"] == p["optimizer_states"], (m, p)
    solo = json.loads(ok(run_cli(["estimate", str(out / "adapters" / "lora" / "config.yaml"), "--world-size",
                                  str(world), "--cpu", "--json"])).stdout)[0]
    assert solo["optimizer_states"] < predicted[0]["optimizer_states"]
    assert predicted[0]["weights"] - solo["weights"] < solo["weights"] / 10  # one base, not three


@pytest.mark.slow
def test_bench_compares_adapters_in_one_job_with_as_many_jobs(ws, built_ops, tmp_path):
    recipe, _ = lm_job(ws, tmp_path, [{"name": "unused"}])
    raw = json.loads(recipe.read_text())
    del raw["adapters"]
    recipe.write_text(json.dumps(raw))
    res = ok(run_cli(["bench", str(recipe), "--adapters", "2", "--steps", "3", "--out", str(tmp_path / "b")]))
    [row] = json.loads((tmp_path / "b" / "adapters.json").read_text())
    assert row["adapters"] == 2 and row["timed_steps"] == 2 and row["job_wall_s"] > 0 and row["jobs_wall_s"] > 0
    assert row["job_peak_bytes"] < row["jobs_peak_sum_bytes"]  # one base held, not two
    assert "| 2 |" in res.stdout
    def rows(path):
        return [json.dumps(json.loads(line), sort_keys=True) for line in path.read_text().splitlines()]
    shares = [rows(tmp_path / "b" / f"share2-{i}.jsonl") for i in range(2)]
    assert shares[0] and shares[1] and sorted(shares[0] + shares[1]) == sorted(rows(ws / "lm.jsonl"))


def test_bench_of_methods_refuses_a_recipe_with_adapters(ws, tmp_path):
    path, out = write(tmp_path, ws, adapters=[{"name": "a"}], methods=[{"name": "lora"}])
    assert_user_error(run_cli(["bench", str(path), "--methods", "lora", "--out", str(out)]),
                      r"bench --methods compares methods on a recipe of one adapter", out)



def test_a_resume_names_what_changed_in_an_adapter_and_allows_its_steps(tmp_path):
    from dstune.errors import UserError
    from dstune.rundir.lock import check_recipe_matches

    saved = {"training": {"lr": 1e-3}, "adapters": [{"name": "a", "training": {"lr": 1e-3, "max_steps": 4}},
                                                     {"name": "b", "methods": [{"name": "ia3"}]}]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    longer = json.loads(json.dumps(saved))
    longer["adapters"][0]["training"]["max_steps"] = 8
    check_recipe_matches(tmp_path, longer, "base")  # an adapter trains longer: allowed, as for one run
    other = json.loads(json.dumps(saved))
    other["adapters"][1]["methods"] = [{"name": "lora"}]
    with pytest.raises(UserError, match=r"differs in adapters\[b\]\.methods \(\[\{'name': 'ia3'\}\] -> "):
        check_recipe_matches(tmp_path, other, "base")
    more = json.loads(json.dumps(saved))
    more["adapters"].append({"name": "c"})
    with pytest.raises(UserError, match=r"adapters\[c\]\.name \(None -> 'c'\)"):
        check_recipe_matches(tmp_path, more, "base")


def topics(path) -> str:
    """Three-class rows (which of three words the text repeats) beside the workspace's two-class reviews."""
    import random

    rng, words = random.Random(3), {"sport": "goal", "music": "song", "food": "bread"}
    rows = []
    for i in range(48):
        label = list(words)[i % 3]
        text = " ".join(rng.choice(["the", "a", "of", words[label], "and", "it"]) for _ in range(8))
        rows.append({"text": text, "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


MIXED = [
    {"name": "lm", "methods": [{"name": "lora", "r": 4}], "training": {"lr": 3e-3}},
    {"name": "sentiment", "task": "classification", "methods": [{"name": "lora", "r": 2}],
     "data": {"train": "CLS", "packing": False, "eval_fraction": 0.25}, "training": {"lr": 1e-2}},
    {"name": "topic", "task": "classification", "methods": [{"name": "prefix", "num_virtual_tokens": 2}],
     "data": {"train": "TOPICS", "packing": False}, "training": {"lr": 3e-2, "micro_batch_size": 4}},
    {"name": "sentiment-ia3", "task": "classification", "methods": [{"name": "ia3"}],  # shares sentiment's forwards
     "data": {"train": "CLS", "packing": False}},
    {"name": "sentiment-prompt", "task": "classification", "methods": [{"name": "prompt", "num_virtual_tokens": 3}],
     "data": {"train": "CLS", "packing": False}},
]


def mixed(ws, tmp_path, adapters: list[dict]) -> list[dict]:
    paths = {"CLS": str(ws / "cls_train.jsonl"), "TOPICS": topics(tmp_path / "topics.jsonl")}
    return json.loads(json.dumps(adapters).replace('"CLS"', json.dumps(paths["CLS"]))
                      .replace('"TOPICS"', json.dumps(paths["TOPICS"])))


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_adapters_of_different_tasks_each_train_as_a_run_of_their_own(ws, tmp_path, model):
    """A causal LM adapter and classifiers (two and three classes; LoRA, prefix, IA3, a soft prompt) over one
    causal LM's base: each
    classifier has its own score head over the base's last hidden state, pooled at each row's last token as
    transformers' classifier pools it, and each adapter equals its own run (a classifier's own run loads the
    base as a transformers classifier)."""
    adapters = mixed(ws, tmp_path, MIXED)
    recipe, out = lm_job(ws, tmp_path, adapters)
    if model != "gpt2":
        cfg = json.loads(recipe.read_text())
        cfg["model"]["path"] = str(ws / model)
        recipe.write_text(json.dumps(cfg))
    res = ok(run_cli(["train", str(recipe)]))
    assert "topic (classification): prefix" in res.stdout
    for spec in adapters:
        run_dir = out / "adapters" / spec["name"]
        assert_same_run(run_dir, solo(run_dir, tmp_path))
    weights = load_file(out / "adapters" / "topic" / "trainable.safetensors")
    assert weights["score.weight"].shape[0] == 3
    res = ok(run_cli(["eval", str(out / "adapters" / "sentiment")]))
    assert "accuracy" in res.stdout
    if model == "gpt2":
        res = ok(run_cli(["estimate", str(recipe)]))
        assert "5 adapters" in res.stdout and "rule of thumb" not in res.stdout + res.stderr
        res = ok(run_cli(["train", str(recipe)]))  # a rerun: nothing to do, every adapter's results kept
        assert "already holds this job" in res.stdout
        summary = json.loads((out / "results.json").read_text())["adapters"]
        assert "after" in summary["sentiment"] and all(
            summary[a["name"]] == json.loads((out / "adapters" / a["name"] / "results.json").read_text())
            for a in adapters)
        student = tmp_path / "solo-sentiment-ia3"  # a run dir of the job teaches another run
        res = ok(run_cli(["train", str(student / "config.yaml"), f"output_dir={tmp_path / 'student'}",
                          f"distill.teacher={out / 'adapters' / 'sentiment'}"]))
        assert f"distilling from {out / 'adapters' / 'sentiment'}" in res.stdout


def test_shared_methods_train_on_every_task_and_each_head_on_its_own(ws, tmp_path):
    """Hard parameter sharing: one LoRA shared by a causal LM task and two classifiers (heads only). Against a
    hand-written loop over the same model and rows: the loss is the sum of each task's mean, the shared LoRA
    and each head are updated by AdamW with their own lr: the job's per-task losses of both steps match."""
    import torch

    from dstune.config import load_config
    from dstune.methods import AdapterSpec, apply_adapter_methods, build_methods
    from dstune.methods.routing import SLOTS, adapter_state_names, route
    from dstune.models.loading import load_model
    from dstune.models.tokenizers import recipe_tokenizer
    from dstune.prepare.cache import prepared_data
    from dstune.tasks import get_task

    rows = {"lm": [{"text": "the plot was good and the actor fine"}, {"text": "a dull film with a weak scene"}],
            "sent": [{"text": "a great lovely film", "label": "pos"}, {"text": "a bad poor plot", "label": "neg"}],
            "topic": [{"text": t, "label": label} for t, label in [("goal goal the", "sport"), ("a song song", "music"),
                                                                   ("bread of bread", "food"), ("it goal", "sport")]]}
    for name, data in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    adapters = [{"name": "lm", "data": {"train": str(tmp_path / "lm.jsonl")}},
                {"name": "sent", "task": "classification", "data": {"train": str(tmp_path / "sent.jsonl")}},
                {"name": "topic", "task": "classification", "data": {"train": str(tmp_path / "topic.jsonl")},
                 "training": {"lr": 3e-2, "micro_batch_size": 4}}]
    recipe, out = lm_job(ws, tmp_path, adapters, max_steps=2, lr=1e-2, warmup_steps=0, lr_schedule="constant",
                         max_grad_norm=0.0)
    cfg = json.loads(recipe.read_text())
    cfg["data"]["packing"] = False
    cfg["shared_methods"], cfg["methods"] = [{"name": "lora", "r": 4}], [{"name": "full"}]
    recipe.write_text(json.dumps(cfg))
    res = ok(run_cli(["train", str(recipe)]))
    assert "shared: lora" in res.stdout and "sent (classification): its head" in res.stdout

    job = load_config(recipe)
    runs = dict(job.adapter_runs())
    tok = recipe_tokenizer(job)
    torch.manual_seed(7)
    model = load_model(runs["lm"], tok)
    data = {name: prepared_data(run, tok, 0, 60)[0] for name, run in runs.items()}
    specs = {name: AdapterSpec([], run.task, data[name].labels) for name, run in runs.items()}
    apply_adapter_methods(model, specs, build_methods(cfg["shared_methods"]), "causal_lm", 7, tok)
    named = dict(model.named_parameters())
    shared = [p for n, p in named.items() if p.requires_grad and SLOTS not in n]
    groups = [{"params": shared, "lr": 1e-2}] + [
        {"params": [named[n] for n in adapter_state_names(model, name)], "lr": run.training.lr}
        for name, run in runs.items() if run.task == "classification"]
    opt = torch.optim.AdamW(groups, betas=tuple(job.training.betas), eps=job.training.eps, weight_decay=0.0)
    for step in (1, 2):
        total = 0.0
        for name, run in runs.items():
            task = get_task(run.task)
            batch = task.collate(list(data[name].train), tok.pad_token_id)
            labels = batch.pop("labels")
            with route(model, name):
                loss = task.loss(model, model(**batch).logits, labels)
            assert abs(loss.item() - read_metrics(out / "adapters" / name)[step]["loss"]) < TOL, (name, step)
            total = total + loss
        opt.zero_grad()
        total.backward()
        opt.step()
    for name in runs:  # each run dir holds the shared LoRA (the same in all) and its own head
        saved = load_file(out / "adapters" / name / "trainable.safetensors")
        assert any("lora_A" in k for k in saved) and ("score.weight" in saved) == (name != "lm")


def test_classifiers_of_different_classes_over_one_classifier_base(ws, tmp_path):
    """A classifier job (the base loaded as a transformers classifier, its head sized for the first adapter's
    two classes): the three-class adapter gets a head of its own shape, and each equals its own run."""
    adapters = mixed(ws, tmp_path, MIXED[1:3])
    recipe, out = lm_job(ws, tmp_path, adapters)
    cfg = json.loads(recipe.read_text())
    cfg["task"], cfg["data"]["packing"] = "classification", False
    recipe.write_text(json.dumps(cfg))
    ok(run_cli(["train", str(recipe)]))
    for spec in adapters:
        run_dir = out / "adapters" / spec["name"]
        assert_same_run(run_dir, solo(run_dir, tmp_path))


def test_overrides_reach_list_items_by_index_or_adapter_name(ws, tmp_path):
    from dstune.config import load_config
    from dstune.errors import UserError

    path, _ = write(tmp_path, ws, shared_methods=[{"name": "lora"}],
                    adapters=[{"name": "a"}, {"name": "b", "methods": [{"name": "ia3"}], "training": {"lr": 1e-3}}])
    cfg = load_config(path, ["adapters[b].training.lr=0.05", "shared_methods[0].r=16", "adapters[0].data.max_length=16",
                             "adapters[b].methods[0].target_modules=[query]"])
    assert cfg.adapters[1].training == {"lr": 0.05} and cfg.shared_methods == [{"name": "lora", "r": 16}]
    assert cfg.adapters[0].data == {"max_length": 16} and cfg.adapters[1].methods[0]["target_modules"] == ["query"]
    with pytest.raises(UserError, match=r"adapters has no item 'c' \(it holds a, b\)"):
        load_config(path, ["adapters[c].training.lr=1"])
