"""training.precision: auto on a CPU with native bf16 is measured once per machine (engine/cpu_probe.py): the
decision from the timings, the kept answer, measuring again, and what the ranks agree on; the probe's
timings are faked here (the test suite pins the answer in conftest.py), its code runs once on a small block."""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import dstune.engine.cpu_probe as probe
import dstune.engine.precision as P
from dstune.errors import UserError


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A CPU with native bf16, a home of its own, nothing pinned; `timings` is what the probe measures, and
    each measurement is counted in `runs`."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(probe.PIN, raising=False)
    monkeypatch.setattr(P, "cpu_bf16", lambda: "avx512_bf16")
    monkeypatch.setattr(probe, "_measured_here", set())
    m = SimpleNamespace(timings={"fp32_s": 1.0, "bf16_s": 1.25}, runs=0, path=tmp_path / ".cache/dstune/cpu-precision.json")

    def measure():
        m.runs += 1
        return dict(m.timings)
    monkeypatch.setattr(probe, "measure", measure)
    return m


def test_bf16_is_taken_only_where_it_is_clearly_faster():
    assert probe.decide({"fp32_s": 1.0, "bf16_s": 1.25}) == ("fp32", 0.8)
    assert probe.decide({"fp32_s": 1.0, "bf16_s": 0.5}) == ("bf16", 2.0)
    assert probe.decide({"fp32_s": 1.0, "bf16_s": 0.95})[0] == "fp32"   # 1.05x: not worth bf16's rounding
    assert probe.decide({"fp32_s": 1.1, "bf16_s": 1.0})[0] == "bf16"


def test_auto_is_measured_once_per_machine_and_kept(machine, monkeypatch):
    assert P.resolve("auto", cuda=False) == ("fp32", "auto: measured bf16 at 0.80x the speed of fp32 on this "
                                             f"avx512_bf16 CPU; measured now, kept in {machine.path}")
    assert machine.runs == 1
    kept = json.loads(machine.path.read_text())
    assert list(kept) == [probe.machine_key()] and kept[probe.machine_key()]["bf16_s"] == 1.25
    monkeypatch.setattr(probe, "_measured_here", set())  # a later process
    assert P.resolve("auto", cuda=False) == ("fp32", "auto: measured bf16 at 0.80x the speed of fp32 on this "
                                             f"avx512_bf16 CPU; kept in {machine.path}")
    assert machine.runs == 1
    # explicit choices, the GPU rule and a CPU without native bf16 measure nothing
    assert P.resolve("bf16", cuda=False) == ("bf16", "set in the recipe")
    assert P.resolve("auto", cuda=True)[0] == "bf16"
    monkeypatch.setattr(P, "cpu_bf16", lambda: None)
    assert P.resolve("auto", cuda=False) == ("fp32", "auto: the CPU has no native bf16")
    assert machine.runs == 1


def test_probe_measures_again_and_a_pin_measures_nothing(machine, monkeypatch):
    P.resolve("auto", cuda=False)
    machine.timings = {"fp32_s": 1.0, "bf16_s": 0.6}   # say the CPU got a new microcode
    monkeypatch.setattr(probe, "_measured_here", set())  # a later process, asked to measure again
    monkeypatch.setenv(probe.PIN, "probe")
    assert P.resolve("auto", cuda=False)[0] == "bf16" and machine.runs == 2
    assert P.resolve("auto", cuda=False)[0] == "bf16" and machine.runs == 2   # once per process
    monkeypatch.delenv(probe.PIN)
    monkeypatch.setattr(probe, "_measured_here", set())
    assert P.resolve("auto", cuda=False) == ("bf16", "auto: measured bf16 at 1.67x the speed of fp32 on this "
                                             f"avx512_bf16 CPU; kept in {machine.path}")   # the new answer is kept
    for pin in ("fp32", "bf16"):
        monkeypatch.setenv(probe.PIN, pin)
        assert P.resolve("auto", cuda=False) == (pin, f"auto: {probe.PIN}={pin}")
    monkeypatch.setenv(probe.PIN, "fast")
    with pytest.raises(UserError, match=r"^DSTUNE_CPU_PRECISION: 'fast' is none of fp32, bf16, probe"):
        P.resolve("auto", cuda=False)
    assert machine.runs == 2


def test_another_thread_count_a_damaged_or_an_unwritable_file_is_measured_afresh(machine, monkeypatch):
    P.resolve("auto", cuda=False)
    threads = torch.get_num_threads()
    key = probe.machine_key()
    assert f"torch {torch.__version__}" in key and f"| {threads} threads" in key
    try:
        torch.set_num_threads(threads + 1)
        P.resolve("auto", cuda=False)
        assert machine.runs == 2 and len(json.loads(machine.path.read_text())) == 2
    finally:
        torch.set_num_threads(threads)
    for damage in ("{not json", json.dumps({key: {"fp32_s": "fast"}})):
        machine.path.write_text(damage)
        assert P.resolve("auto", cuda=False)[0] == "fp32"
    assert machine.runs == 4 and json.loads(machine.path.read_text())[key]["fp32_s"] == 1.0
    (machine.path.parent / "a-file").write_text("")   # an unwritable cache: measured, not kept, no error
    monkeypatch.setattr(probe, "cache_file", lambda: machine.path.parent / "a-file" / "cpu-precision.json")
    assert P.resolve("auto", cuda=False)[0] == "fp32" and machine.runs == 5


def test_processes_of_one_machine_measure_once(machine, monkeypatch):
    """The ranks of a node start together: one measures under the file lock, the others read its answer."""
    measure = probe.measure

    def slow():
        time.sleep(0.3)
        return measure()
    monkeypatch.setattr(probe, "measure", slow)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(probe.cpu_precision("avx512_bf16")[0]))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == ["fp32"] * 3 and machine.runs == 1


def test_the_probe_itself_times_both_precisions_and_leaves_the_random_state_alone():
    shape = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    state = torch.random.get_rng_state()
    timings = probe.measure(shape, tokens=(1, 16), repeats=1)
    assert timings.keys() == {"fp32_s", "bf16_s"} and all(0 < v < 5 for v in timings.values())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_ranks_train_in_rank_0s_precision(monkeypatch, tmp_path):
    import torch.distributed as dist

    from dstune.config import load_config
    from dstune.engine.trainer import Checked, _agree_on_precision

    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: causal_lm\nmodel: {tiny: llama}\ndata: {train: random}\noutput_dir: o\n")
    mine = Checked(load_config(recipe).with_training(precision="bf16"), [], None, None, None, [], "base",
                   "bf16 (auto: measured ...)", "")
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: objects.__setitem__(0, "fp32"))
    agreed = _agree_on_precision(mine, SimpleNamespace(world=2, rank=1))
    assert agreed.cfg.training.precision == "fp32" and agreed.precision_note == "fp32 (auto: rank 0's)"
    assert _agree_on_precision(mine, SimpleNamespace(world=1, rank=0)) is mine
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: None)   # rank 0 measured the same
    assert _agree_on_precision(mine, SimpleNamespace(world=2, rank=1)) is mine
