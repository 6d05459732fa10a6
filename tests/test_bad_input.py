"""Bad input ends with exit 2, one line naming the key or file:line, no traceback, and no output_dir."""
from __future__ import annotations

import json
import re

import pytest

from helpers import assert_user_error, run_cli, write


def test_unknown_config_key_names_key_and_line(ws, tmp_path):
    text = "task: classification\nmodel:\n  path: MODEL\ndata:\n  train: DATA\ntraining:\n  lrr: 0.1\noutput_dir: OUT\n"
    path, out = write(tmp_path, ws, text)
    assert_user_error(run_cli(["train", str(path)]), r"recipe\.yaml:7: training\.lrr: unknown key \(did you mean 'lr'\?\)$", out)


def test_wrong_type_names_key(ws, tmp_path):
    path, out = write(tmp_path, ws, training__lr="fast")
    assert_user_error(run_cli(["train", str(path)]), r"recipe\.yaml:\d+: training\.lr: .*number.*'fast'", out)


def test_wrong_type_in_override_names_key(ws, tmp_path):
    path, out = write(tmp_path, ws)
    assert_user_error(run_cli(["train", str(path), "training.micro_batch_size=two"]),
                      r"^dstune: error: override training\.micro_batch_size=two: training\.micro_batch_size: .*integer", out)


@pytest.mark.parametrize("override, message", [
    ("training.lrr=1", r"override training\.lrr=1: training\.lrr: unknown key \(did you mean 'lr'\?\)$"),
    ("evaluaton.every=1", r"override evaluaton\.every=1: evaluaton: unknown key \(did you mean 'evaluation'\?\)$"),
])
def test_a_misspelt_key_given_on_the_command_line_is_named_as_given_there(ws, tmp_path, override, message):
    """Not as a line of the recipe file, which does not hold it."""
    path, out = write(tmp_path, ws)
    assert_user_error(run_cli(["train", str(path), override]), r"^dstune: error: " + message, out)


def test_missing_data_file(ws, tmp_path):
    path, out = write(tmp_path, ws, data__train=str(tmp_path / "nope.jsonl"))
    assert_user_error(run_cli(["train", str(path)]), r"data\.train: file not found: .*nope\.jsonl", out)


def test_malformed_jsonl_row_names_file_and_line(ws, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": \n')
    path, out = write(tmp_path, ws, data__train=str(bad))
    assert_user_error(run_cli(["train", str(path)]), r"bad\.jsonl:3: data\.train: malformed JSON row", out)


def test_missing_label_column(ws, tmp_path):
    path, out = write(tmp_path, ws, data__label_column="sentiment")
    assert_user_error(run_cli(["train", str(path)]),
                      r"data\.label_column: column 'sentiment' not in .*cls_train\.jsonl \(columns: .*label", out)


def test_a_label_column_mixing_numbers_and_text_names_the_first_row_that_differs(ws, tmp_path):
    rows = [{"text": "good film", "label": 1}, {"text": "fine film", "label": 1}, {"text": "bad film", "label": "neg"}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    path, out = write(tmp_path, ws, data__train=str(data))
    assert_user_error(run_cli(["train", str(path)]), r"mixed\.jsonl:3: data\.label_column: 'label' is text here "
                      r"\('neg'\) but a number in earlier rows \(1\); give it one type in every row", out)


def test_fp16_on_a_cpu_that_cannot_run_it_is_one_line(ws, tmp_path, monkeypatch):
    import dstune.engine.precision as precision
    monkeypatch.setattr(precision, "cpu_fp16", lambda: False)
    path, out = write(tmp_path, ws, training__precision="fp16")
    assert_user_error(run_cli(["train", str(path)]), r"training\.precision: fp16 does not run on this CPU "
                      r"\(DeepSpeed's CPU accelerator needs oneDNN fp16: AVX512-FP16 or AMX-FP16\)", out)


def test_empty_dataset(ws, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path, out = write(tmp_path, ws, data__train=str(empty))
    assert_user_error(run_cli(["train", str(path)]), r"data\.train: .*empty\.jsonl has no rows", out)


def test_unknown_deepspeed_config(ws, tmp_path):
    path, out = write(tmp_path, ws, deepspeed="zero9")
    assert_user_error(run_cli(["train", str(path)]), r"deepspeed: unknown config 'zero9'; known: zero0, zero1", out)


def test_unknown_method(ws, tmp_path):
    path, out = write(tmp_path, ws, methods=[{"name": "magic"}])
    assert_user_error(run_cli(["train", str(path)]), r"methods\[0\]\.name: unknown method 'magic'", out)


def test_missing_recipe(tmp_path):
    res = run_cli(["train", str(tmp_path / "none.yaml")])
    assert res.returncode == 2 and "dstune: error: recipe not found" in res.stderr


@pytest.mark.parametrize("override", ["training.lr", "=3"])
def test_malformed_override(ws, tmp_path, override):
    path, out = write(tmp_path, ws)
    assert_user_error(run_cli(["train", str(path), override]), r"expected key=value", out)


def test_missing_tokenizer(ws, tmp_path):
    path, out = write(tmp_path, ws, tokenizer__path=str(tmp_path / "no-tokenizer"))
    assert_user_error(run_cli(["train", str(path)]), r"tokenizer\.path: not found: .*no-tokenizer", out)


def test_data_smaller_than_one_global_batch(ws, tmp_path):
    path, out = write(tmp_path, ws, training__micro_batch_size=500)
    assert_user_error(run_cli(["train", str(path)]),
                      r"data\.train: 256 examples are fewer than one global batch .* = 500\)", out)


@pytest.mark.parametrize("pointer", ['{"tag": "../../elsewhere/ckpt", "global_step": 4}', "{not json"])
def test_checkpoint_pointer_outside_the_run_is_refused_before_anything_is_written(ws, tmp_path, pointer):
    """Resume loads (unpickles) what last_complete names: only a checkpoint folder of this run qualifies."""
    path, out = write(tmp_path, ws)
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last_complete").write_text(pointer)
    (out / "config.yaml").write_text("the earlier run's config\n")
    res = run_cli(["train", str(path)])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert re.search(r"^dstune: error: .*checkpoints/last_complete: (tag '\.\./\.\./elsewhere/ckpt' is not a checkpoint "
                     r"of this run|not a checkpoint pointer dstune wrote)", res.stderr.strip().splitlines()[-1])
    assert (out / "config.yaml").read_text() == "the earlier run's config\n"  # nothing overwritten


@pytest.mark.parametrize("where, message", [
    ("file", r"output_dir: .*out is a file, not a folder"),
    ("under_file", r"output_dir: .*blocker/out would be made under .*blocker, which is a file"),
])
def test_output_dir_that_cannot_be_a_folder(ws, tmp_path, where, message):
    if where == "file":
        path, out = write(tmp_path, ws)
        out.write_text("a file the user keeps")
    else:
        (tmp_path / "blocker").write_text("a file")
        path, out = write(tmp_path, ws, output_dir=str(tmp_path / "blocker" / "out"))
    res = run_cli(["train", str(path)])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert re.search(message, res.stderr.strip().splitlines()[-1])
    if where == "file":
        assert out.read_text() == "a file the user keeps"


def test_max_length_beyond_the_models_positions_is_refused_before_the_run_dir(ws, tmp_path):
    path, out = write(tmp_path, ws, data__max_length=4096)
    assert_user_error(run_cli(["train", str(path)]),
                      r"data\.max_length: 4,096 tokens do not fit the model's 512 positions \(bert\); use at most 512",
                      out)


def test_a_loss_that_is_not_finite_stops_the_run_and_keeps_the_last_checkpoint(ws, tmp_path):
    path, out = write(tmp_path, ws, training__lr=1e30, training__max_steps=8, training__checkpoint_every=1)
    res = run_cli(["train", str(path)])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    last = [line for line in res.stderr.splitlines() if line.startswith("dstune: error:")][-1]
    m = re.search(r"training: the loss is (nan|inf) at step (\d+); stopped without saving the weights it updated "
                  r"\(the last complete checkpoint, (step_\d+), is kept", last)
    assert m, last
    assert int(m.group(3)[5:]) == int(m.group(2)) - 1
    assert json.loads((out / "checkpoints" / "last_complete").read_text())["tag"] == m.group(3)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # strict JSON: no NaN written


def test_a_bad_argument_is_one_line_naming_the_commands_help(tmp_path):
    res = run_cli(["export", str(tmp_path), "--format", "merge", "--out", str(tmp_path / "x")])
    assert res.returncode == 2 and res.stderr.strip() == ("dstune: error: argument --format: invalid choice: 'merge' "
                                                          "(choose from 'peft', 'merged'); see dstune export --help")
