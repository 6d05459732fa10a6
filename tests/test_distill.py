"""Knowledge distillation: the divergence's value and gradient, and training with a teacher."""
from __future__ import annotations

import pytest
import torch

from dstune.config import DIVERGENCES
from dstune.distill.divergence import distillation_loss


def reference(student: torch.Tensor, teacher: torch.Tensor, T: float, kind: str) -> torch.Tensor:
    """The textbook formula in float64, differentiated by autograd."""
    s, t = torch.log_softmax(student / T, -1), torch.log_softmax(teacher / T, -1)
    ps, pt = s.exp(), t.exp()
    if kind == "forward_kl":
        d = (pt * (t - s)).sum(-1)
    elif kind == "reverse_kl":
        d = (ps * (s - t)).sum(-1)
    else:
        m = (ps + pt) / 2
        d = 0.5 * (ps * (s - m.log())).sum(-1) + 0.5 * (pt * (t - m.log())).sum(-1)
    return T ** 2 * d.mean()


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_divergence_and_its_gradient_match_autograd_of_a_float64_reference(kind, T):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(37, 50, generator=g) * 3).requires_grad_()
    teacher = torch.randn(37, 50, generator=g) * 3
    ref_student = student.detach().double().requires_grad_()
    want = reference(ref_student, teacher.double(), T, kind)
    want.backward()
    got = distillation_loss(student, teacher, T, kind, chunk=8)  # several chunks, a ragged last one
    got.backward()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7), (got, want)
    assert torch.allclose(student.grad.double(), ref_student.grad, rtol=1e-4, atol=1e-8)
    assert got.item() >= 0


def test_identical_distributions_have_no_divergence_nor_gradient():
    x = torch.randn(4, 9).requires_grad_()
    for kind in DIVERGENCES:
        loss = distillation_loss(x, x.detach().clone(), 2.0, kind)
        loss.backward()
        assert abs(loss.item()) < 1e-6 and x.grad.abs().max() < 1e-6
        x.grad = None


# ---- training with a teacher -------------------------------------------------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402

from helpers import lm_recipe, ok, read_metrics, run_cli  # noqa: E402


def with_teacher(recipe: str, **distill) -> str:
    cfg = json.loads(open(recipe).read())
    cfg["distill"] = distill
    open(recipe, "w").write(json.dumps(cfg))
    return recipe


def digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


LORA = [{"name": "lora", "r": 4}]


def test_alpha_zero_is_plain_training_and_the_teacher_is_left_as_it_was(ws, built_ops, tmp_path):
    """A Llama teacher (same tokenizer) for a GPT-2 student: with alpha 0 the losses are those of the run
    without a teacher, to the bit; the divergence is logged; the teacher's folder is unchanged and none of
    it is in the student's checkpoint."""
    before = digest(ws / "llama")
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "plain", methods=LORA, max_steps=4)]))
    res = ok(run_cli(["train", with_teacher(lm_recipe(ws, tmp_path, "kd0", methods=LORA, max_steps=4),
                                            teacher=str(ws / "llama"), alpha=0.0)]))
    assert f"distilling from {ws / 'llama'} (forward_kl, T 2, alpha 0)" in res.stdout
    plain, kd0 = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "kd0")
    assert [plain[s]["loss"] for s in plain] == [kd0[s]["loss"] for s in kd0]
    assert all(kd0[s]["distill"] > 0 for s in kd0)
    assert digest(ws / "llama") == before
    ckpt = next((tmp_path / "kd0" / "checkpoints").glob("step_*"))
    assert sum(f.stat().st_size for f in ckpt.rglob("*")) < (ws / "gpt2" / "model.safetensors").stat().st_size / 2


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_two_ranks_at_zero3_with_a_partitioned_teacher_match_one_rank(ws, built_ops, tmp_path, divergence):
    for name, stage, nproc in (("one", None, 1), ("two", 3, 2)):  # the same global batch of 4
        recipe = with_teacher(lm_recipe(ws, tmp_path, name, stage, methods=LORA, max_steps=4,
                                        gradient_accumulation_steps=3 - nproc),
                              teacher=str(ws / "llama"), alpha=0.7, temperature=1.5, divergence=divergence)
        ok(run_cli(["train", recipe], nproc=nproc))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for s in one:
        assert abs(one[s]["loss"] - two[s]["loss"]) < 1e-5 and abs(one[s]["distill"] - two[s]["distill"]) < 1e-6


def test_a_run_dir_teaches_a_classifier(ws, built_ops, tmp_path):
    """The teacher is a finished dstune run (fully fine-tuned tiny BERT); a LoRA student distils from it
    alone (alpha 1) and gets closer to it: the divergence falls."""
    from helpers import GOOD

    teacher = tmp_path / "teacher.yaml"
    cfg = json.loads(json.dumps(GOOD).replace("MODEL", str(ws / "bert")).replace("TOK", str(ws / "tokenizer"))
                     .replace("DATA", str(ws / "cls_train.jsonl")).replace("OUT", str(tmp_path / "teacher")))
    teacher.write_text(json.dumps({**cfg, "training": {"precision": "fp32", "max_steps": 60, "lr": 1e-2}}))
    ok(run_cli(["train", str(teacher)]))
    student = tmp_path / "student.yaml"
    student.write_text(json.dumps({**cfg, "output_dir": str(tmp_path / "student"), "methods": LORA,
                                   "training": {"precision": "fp32", "max_steps": 30, "lr": 1e-2},
                                   "distill": {"teacher": str(tmp_path / "teacher"), "alpha": 1.0,
                                               "temperature": 1.0}}))
    ok(run_cli(["train", str(student)]))
    kd = [r["distill"] for _, r in sorted(read_metrics(tmp_path / "student").items())]
    assert sum(kd[-5:]) < 0.5 * sum(kd[:5]), kd


def test_a_teacher_that_cannot_teach_is_refused(ws, tmp_path):
    import shutil

    from dstune.models.tokenizers import train_sentencepiece
    from helpers import assert_user_error

    other = tmp_path / "other-vocab"
    shutil.copytree(ws / "llama", other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    corpus = tmp_path / "other.txt"
    corpus.write_text("".join(f"zebra quartz {i} jumps over the lazy fox\n" for i in range(200)))
    train_sentencepiece([str(corpus)], str(other), vocab_size=60)
    recipe = with_teacher(lm_recipe(ws, tmp_path, "run", methods=LORA), teacher=str(other))
    assert_user_error(run_cli(["train", recipe]), r"distill\.teacher: .*other-vocab has another vocabulary "
                                                   r"\(\d+ tokens, this run's \d+\)", tmp_path / "run")
    recipe = with_teacher(lm_recipe(ws, tmp_path, "run", methods=LORA), teacher=str(tmp_path / "missing"))
    assert_user_error(run_cli(["train", recipe]), r"distill\.teacher: not a folder: .*missing", tmp_path / "run")


def test_the_estimate_counts_the_teachers_weights_and_logits(ws, tmp_path):
    import transformers as T

    from dstune.config import load_config
    from dstune.planning.estimate import estimate

    recipe = lm_recipe(ws, tmp_path, "run", methods=LORA)
    [plain], _, _ = estimate(load_config(recipe), 1, cuda=False)
    [kd], _, _ = estimate(load_config(with_teacher(recipe, teacher=str(ws / "llama"))), 1, cuda=False)
    [kd3, _], _, _ = estimate(load_config(recipe, ["deepspeed=zero3"]), 2, cuda=False)
    teacher = T.AutoModelForCausalLM.from_pretrained(ws / "llama")
    n = sum(p.numel() for p in teacher.parameters())
    assert kd.teacher_weights == 4 * n and kd.teacher_activations == 4 * 2 * 32 * teacher.config.vocab_size
    assert kd.total == plain.total + kd.teacher_weights + kd.teacher_activations
    assert kd3.teacher_weights < 4 * n * 0.55  # partitioned over 2 ranks (each parameter rounded up)


def test_rows_without_labels_train_through_the_teacher_alone(ws, built_ops, tmp_path):
    """32 labelled reviews plus 192 without labels (data.unlabeled): micro-batches that hold no labelled row
    train on the divergence alone (no 0/0 task loss), every step is finite, and the start-up line lists the
    unlabeled source."""
    from helpers import GOOD, assert_user_error

    rows = (ws / "cls_train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "labelled.jsonl").write_text("".join(rows[:32]))
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"text": json.loads(r)["text"]}) + "\n"
                                                 for r in rows[32:224]))
    cfg = json.loads(json.dumps(GOOD).replace("MODEL", str(ws / "bert")).replace("TOK", str(ws / "tokenizer"))
                     .replace("DATA", str(ws / "cls_train.jsonl")).replace("OUT", str(tmp_path / "teacher")))
    (tmp_path / "teacher.yaml").write_text(json.dumps({**cfg, "training": {"precision": "fp32", "max_steps": 20,
                                                                           "lr": 1e-2}}))
    ok(run_cli(["train", str(tmp_path / "teacher.yaml")]))

    student = {**cfg, "output_dir": str(tmp_path / "student"), "methods": LORA,
               "data": {"train": str(tmp_path / "labelled.jsonl"), "unlabeled": str(tmp_path / "pool.jsonl")},
               "training": {"precision": "fp32", "epochs": 1, "micro_batch_size": 8, "lr": 1e-2}}
    (tmp_path / "plain.yaml").write_text(json.dumps(student))
    assert_user_error(run_cli(["train", str(tmp_path / "plain.yaml")]),
                      r"data\.unlabeled: rows without labels train only through a teacher's outputs", tmp_path / "student")
    (tmp_path / "student.yaml").write_text(json.dumps({**student, "distill": {"teacher": str(tmp_path / "teacher")}}))
    res = ok(run_cli(["train", str(tmp_path / "student.yaml")]))
    assert "pool.jsonl (rows, no labels: the teacher alone): 192 rows" in res.stdout, res.stdout
    train = read_metrics(tmp_path / "student")
    assert sorted(train) == list(range(1, 29))  # (32 + 192) / 8
    assert all(r["loss"] == r["loss"] and r["distill"] >= 0 for r in train.values())
    # the data is prepared now, and the cache is keyed by the data alone: without a teacher, still refused
    assert_user_error(run_cli(["train", str(tmp_path / "plain.yaml"), f"output_dir={tmp_path / 'plain'}"]),
                      r"data\.unlabeled: rows without labels train only through a teacher's outputs", tmp_path / "plain")


def test_rows_without_labels_are_refused_where_they_cannot_train(ws, tmp_path):
    from dstune.config import load_config
    from dstune.prepare.pipeline import prepare_data
    from dstune.errors import UserError
    from dstune.models.tokenizers import load_tokenizer

    recipe = with_teacher(lm_recipe(ws, tmp_path, "run", methods=LORA), teacher=str(ws / "llama"))
    cfg = load_config(recipe, [f"data.unlabeled={ws / 'lm.jsonl'}"])
    with pytest.raises(UserError, match=r"^data\.unlabeled: rows without labels are for classification; in "
                                        r"causal_lm every row holds its own targets"):
        prepare_data(cfg, load_tokenizer(str(ws / "tokenizer")))


def test_a_classifier_teacher_without_the_datas_classes_is_refused(ws, tmp_path):
    """A model folder whose config.json does not name the data's labels, in order, cannot teach them."""
    from helpers import assert_user_error, write

    path, out = write(tmp_path, ws, distill={"teacher": str(ws / "bert")})
    assert_user_error(run_cli(["train", str(path)]),
                      r"distill\.teacher: .*bert's classes .* are not the data's labels \['neg', 'pos'\] in that "
                      r"order", out)


def test_a_run_dir_of_other_labels_or_another_task_cannot_teach(ws, built_ops, tmp_path):
    """A dstune run trained on other classes, or for another task, is refused by name before any training."""
    from helpers import GOOD, assert_user_error

    rows = [json.loads(line) for line in (ws / "cls_train.jsonl").read_text().splitlines()]
    (tmp_path / "abc.jsonl").write_text("".join(json.dumps({**r, "label": {"pos": "a", "neg": "b"}[r["label"]]})
                                                + "\n" for r in rows))
    cfg = json.loads(json.dumps(GOOD).replace("MODEL", str(ws / "bert")).replace("TOK", str(ws / "tokenizer"))
                     .replace("DATA", str(tmp_path / "abc.jsonl")).replace("OUT", str(tmp_path / "ab-teacher")))
    (tmp_path / "t.yaml").write_text(json.dumps({**cfg, "training": {"precision": "fp32", "max_steps": 1}}))
    ok(run_cli(["train", str(tmp_path / "t.yaml")]))
    ok(run_cli(["train", lm_recipe(ws, tmp_path, "lm-teacher", methods=LORA), "training.max_steps=1"]))
    student = {**cfg, "data": {"train": str(ws / "cls_train.jsonl")}, "output_dir": str(tmp_path / "student")}
    for teacher, message in (("ab-teacher", r"distill\.teacher: .*ab-teacher was trained on labels \['a', 'b'\], "
                                            r"the data has \['neg', 'pos'\]"),
                             ("lm-teacher", r"distill\.teacher: .*lm-teacher is a causal_lm model and this run is "
                                            r"classification")):
        (tmp_path / "s.yaml").write_text(json.dumps({**student, "distill": {"teacher": str(tmp_path / teacher)}}))
        assert_user_error(run_cli(["train", str(tmp_path / "s.yaml")]), message, tmp_path / "student")
