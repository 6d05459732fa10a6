"""dstune's preference objectives against TRL 1.16, the reference implementation: the same tiny model, the
same batch, fp32: the loss, the rewards and the trainable parameters' gradients agree to 1e-5, for full
fine-tuning (TRL with a copy as ref_model) and LoRA (TRL's PEFT path, ref_model=None: the adapter disabled;
dstune: LoRA stepped aside). Where TRL 1.16 and the papers differ (cDPO, ORPO's NLL) the test composes the
oracle from TRL's own parts as dstune/preference/losses.py documents."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from dstune.config import PreferenceConfig
from dstune.data.batching import IGNORE
from dstune.methods import apply_methods, build_methods
from dstune.preference.losses import Logps
from dstune.preference.objective import Frozen, Objective, SteppedAside, Tally, forward_logps
from dstune.tasks.preference import Preference, encode_replies, mismatched

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

PROMPTS = ["say good", "say bad things now", "tell me fun"]
CHOSEN = ["good good it is", "bad", "fun fun fun is it"]
REJECTED = ["awful it is not", "great great it is", "dull"]
LORA = {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "c_attn"]}


def _model(ws, family: str):
    import transformers as T
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_pretrained(ws / family, torch_dtype=torch.float32)
    for m in model.modules():  # TRL's disable_dropout; dstune's reference runs in eval mode
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _tokenizer(ws):
    from dstune.models.tokenizers import load_tokenizer
    return load_tokenizer(str(ws / "tokenizer"))


def _pair_batch(tok) -> dict:
    enc = encode_replies(tok, [(p, r) for p, c, rj in zip(PROMPTS, CHOSEN, REJECTED) for r in (c, rj)])
    rows = [{"input_ids": enc[2 * i][0], "labels": enc[2 * i][1], "rejected_ids": enc[2 * i + 1][0],
             "rejected_labels": enc[2 * i + 1][1]} for i in range(len(PROMPTS))]
    return Preference().collate(rows, tok.pad_token_id)


def _kto_batch(tok) -> dict:
    enc = encode_replies(tok, list(zip(PROMPTS + PROMPTS[:1], CHOSEN + REJECTED[:1])))
    ids, labels = [e[0] for e in enc], [e[1] for e in enc]
    kl = mismatched(ids, labels, 64)
    rows = [{"input_ids": i, "labels": lab, "desirable": d, "kl_input_ids": ki, "kl_labels": kla}
            for i, lab, d, ki, kla in zip(ids, labels, [1, 1, 1, 0], kl["kl_input_ids"], kl["kl_labels"])]
    return Preference().collate(rows, tok.pad_token_id)


def _dstune(model, cfg: PreferenceConfig, batch: dict, lora: bool):
    """(loss, logged means, {name: grad}) of dstune's objective on `batch` (one micro-batch, one rank)."""
    if lora:
        apply_methods(model, build_methods([LORA]), "preference")
        _randomise_lora(model)
        reference = SteppedAside()
    else:
        reference = Frozen(copy.deepcopy(model).requires_grad_(False).eval())
        _perturb(model)
        model.requires_grad_(True)
    objective = Objective(cfg, reference if cfg.uses_reference() else None)
    tally = Tally()
    objective.start_step(model, [batch], len(batch["input_ids"]) if cfg.loss == "kto" else 0)
    tokens = int((batch["labels"][:len(PROMPTS), 1:] != IGNORE).sum()) if cfg.loss != "kto" else \
        int((batch["labels"][batch["desirable"], 1:] != IGNORE).sum())
    loss = objective.loss(model, batch, 1 / tokens, tally)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), objective.metrics(tally.reduced("cpu")), grads


def _perturb(model) -> None:
    """The policy a step or two away from the reference (full fine-tuning), the same for dstune and TRL."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _randomise_lora(model) -> None:
    """B is zero at init (policy == reference); give both A and B values so the rewards differ from 0."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _perturbed(model):
    _perturb(model)
    return model


def _lora_config(model):
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=model.config.model_type == "gpt2",
                           target_modules=[t for t in LORA["target_modules"]
                                           if any(n.endswith(t) for n, _ in model.named_modules())])


def _set_peft_weights(wrapped) -> None:
    """The values _randomise_lora gives dstune's LoRA, in PEFT's parameters (same names once PEFT's prefix and
    adapter name are dropped, same order)."""
    ours = {n.replace("base_model.model.", "").replace(".default", ""): p for n, p in wrapped.named_parameters()
            if "lora_" in n}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in sorted(ours):
            ours[n].copy_(torch.randn(ours[n].shape, generator=g) * 0.3)


def _peft(model):
    """The same LoRA through PEFT, with the same weights as dstune's."""
    wrapped = peft.get_peft_model(model, _lora_config(model))
    _set_peft_weights(wrapped)
    return wrapped


def _trl_grads(model, lora: bool) -> dict:
    if lora:
        return {n.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
                for n, p in model.named_parameters() if p.requires_grad}
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "trl"), report_to=[], bf16=False, gradient_checkpointing=False,
               use_cpu=True, per_device_train_batch_size=2, **kw)


def _dataset(kto: bool = False):
    from datasets import Dataset
    if kto:
        return Dataset.from_dict({"prompt": PROMPTS, "completion": CHOSEN, "label": [True, False, True]})
    return Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})


def _close(ours: dict, theirs: dict, keys: list[str], atol: float = 1e-5) -> None:
    for k in keys:
        assert ours[k] == pytest.approx(theirs[k], abs=atol, rel=1e-5), (k, ours[k], theirs[k])


def _same_grads(ours: dict, theirs: dict) -> None:
    assert ours and set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:6]
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], atol=1e-5, rtol=1e-4, msg=n)


def _trl_metrics(trainer) -> dict:
    """What the trainer logged for the one batch (under "eval": the models are in eval mode, no dropout)."""
    return {k: sum(v) / len(v) for mode in ("train", "eval") for k, v in trainer._metrics[mode].items() if v}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "dpo+sft"])
def test_dpo_and_ipo_equal_trl(ws, tmp_path, family, lora, loss_type):
    tok = _tokenizer(ws)
    batch = _pair_batch(tok)
    loss_name, sft = loss_type.split("+")[0], 0.5 if "sft" in loss_type else 0.0
    cfg = PreferenceConfig(loss=loss_name, beta=0.3, sft_weight=sft)
    ours_loss, ours, ours_grads = _dstune(_model(ws, family), cfg, batch, lora)

    model = _model(ws, family)
    ref_model = None if lora else copy.deepcopy(model)
    policy = model if lora else _perturbed(model)
    types = ["sigmoid" if loss_name == "dpo" else "ipo"] + (["sft"] if sft else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=policy, ref_model=ref_model,
                                 args=_args(trl.DPOConfig, tmp_path, beta=0.3, loss_type=types,
                                            loss_weights=[1.0, sft] if sft else None),
                                 train_dataset=_dataset(), processing_class=tok,
                                 peft_config=_lora_config(model) if lora else None)  # TRL adds the adapter
    if lora:  # ref_model=None: TRL's reference is the model with this adapter disabled
        policy = trainer.model
        _set_peft_weights(policy)
    trl_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                 "completion_mask": (batch["labels"] != IGNORE).long()}
    theirs_loss = trainer.compute_loss(trainer.model, trl_batch)
    theirs_loss.backward()
    assert float(ours_loss) == pytest.approx(float(theirs_loss), abs=1e-5)
    _close(ours, _trl_metrics(trainer), ["rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                         "rewards/margins", "logps/chosen", "logps/rejected"])
    assert abs(ours["rewards/margins"]) > 1e-3  # policy and reference differ: the check has teeth
    _same_grads(ours_grads, _trl_grads(policy, lora))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cdpo_equals_trl_smoothed_sigmoid(ws, tmp_path, family, lora):
    """TRL 1.16's DPO has no cDPO; its CPO `sigmoid` loss with label_smoothing is cDPO's formula, applied
    here to the log-ratios (policy minus reference) dstune computes."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok = _tokenizer(ws)
    batch = _pair_batch(tok)
    cfg = PreferenceConfig(loss="dpo", beta=0.3, label_smoothing=0.2)
    model = _model(ws, family)
    ours_loss, ours, ours_grads = _dstune(model, cfg, batch, lora)
    reference = SteppedAside() if lora else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpo = CPOTrainer(model=_model(ws, family), args=_args(CPOConfig, tmp_path, beta=0.3, loss_type="sigmoid",
                                                               label_smoothing=0.2, cpo_alpha=0.0),
                         train_dataset=_dataset(), processing_class=tok)
    model.zero_grad()
    policy = forward_logps(model, batch)
    ref = reference.logps(model, batch) if lora else \
        Frozen(_dstune_copy(ws, family)).logps(None, batch)
    (pc, pr), (rc, rr) = policy.split(), ref.split()
    losses, chosen, rejected = cpo.cpo_loss(pc.sum - rc.sum, pr.sum - rr.sum)
    losses.mean().backward()
    assert float(ours_loss) == pytest.approx(float(losses.mean()), abs=1e-5)
    assert ours["rewards/chosen"] == pytest.approx(float(chosen.mean()), abs=1e-5)
    assert ours["rewards/rejected"] == pytest.approx(float(rejected.mean()), abs=1e-5)
    _same_grads(ours_grads, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def _dstune_copy(ws, family: str):
    return _model(ws, family).requires_grad_(False).eval()


def _cpo_batch(batch: dict, pad_id: int) -> dict:
    """dstune's pair batch in the layout of TRL's CPO/ORPO collator (prompt, chosen and rejected columns)."""
    n = len(batch["input_ids"]) // 2
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    return {"chosen_input_ids": ids[:n], "chosen_attention_mask": mask[:n], "chosen_labels": labels[:n],
            "rejected_input_ids": ids[n:], "rejected_attention_mask": mask[n:], "rejected_labels": labels[n:]}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("sft", [0.0, 0.7])
def test_simpo_equals_trl_cpo_simpo(ws, tmp_path, family, lora, sft):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok = _tokenizer(ws)
    batch = _pair_batch(tok)
    cfg = PreferenceConfig(loss="simpo", beta=2.0, simpo_gamma=0.6, label_smoothing=0.1, sft_weight=sft)
    ours_loss, ours, ours_grads = _dstune(_model(ws, family), cfg, batch, lora)
    model = _model(ws, family)
    policy = _peft(model) if lora else _perturbed(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpo = CPOTrainer(model=policy, args=_args(CPOConfig, tmp_path, beta=2.0, loss_type="simpo", simpo_gamma=0.6,
                                                  label_smoothing=0.1, cpo_alpha=sft),
                         train_dataset=_dataset(), processing_class=tok)
    theirs_loss, theirs = cpo.get_batch_loss_metrics(cpo.model, _cpo_batch(batch, tok.pad_token_id))
    theirs_loss.backward()
    assert float(ours_loss) == pytest.approx(float(theirs_loss), abs=1e-5)
    _close(ours, {k: float(v) for k, v in theirs.items()}, ["rewards/chosen", "rewards/rejected",
                                                            "rewards/accuracies", "rewards/margins"])
    if sft:
        assert ours["nll_loss"] == pytest.approx(float(theirs["nll_loss"]), abs=1e-5)
    _same_grads(ours_grads, _trl_grads(policy, lora))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_orpo_equals_trl_odds_ratio_with_the_papers_nll(ws, tmp_path, family, lora):
    """ORPO: TRL's odds-ratio term (ORPOTrainer.odds_ratio_loss) on averaged log-probabilities, plus the NLL
    of the chosen reply's tokens (TRL's CPO NLL: the paper's; TRL's ORPO also counts the prompt)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = _tokenizer(ws)
    batch = _pair_batch(tok)
    ours_loss, ours, ours_grads = _dstune(_model(ws, family), PreferenceConfig(loss="orpo", beta=0.25), batch, lora)
    model = _model(ws, family)
    policy = _peft(model) if lora else _perturbed(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpo = CPOTrainer(model=policy, args=_args(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=1.0),
                         train_dataset=_dataset(), processing_class=tok)
        orpo = ORPOTrainer(model=_model(ws, family), args=_args(ORPOConfig, tmp_path / "o", beta=0.25),
                           train_dataset=_dataset(), processing_class=tok)
    pc, pr, _, _, nll = cpo.concatenated_forward(cpo.model, _cpo_batch(batch, tok.pad_token_id))[:5]
    losses, chosen, rejected, ratio, log_odds = orpo.odds_ratio_loss(pc, pr)
    theirs_loss = nll - losses.mean()
    theirs_loss.backward()
    assert float(ours_loss) == pytest.approx(float(theirs_loss), abs=1e-5)
    assert ours["rewards/chosen"] == pytest.approx(float(chosen.mean()), abs=1e-5)
    assert ours["log_odds_ratio"] == pytest.approx(float(ratio), abs=1e-5)
    assert ours["log_odds_chosen"] == pytest.approx(float(log_odds), abs=1e-5)
    assert ours["nll_loss"] == pytest.approx(float(nll), abs=1e-5)
    _same_grads(ours_grads, _trl_grads(policy, lora))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_kto_equals_trl(ws, tmp_path, family, lora):
    tok = _tokenizer(ws)
    batch = _kto_batch(tok)
    cfg = PreferenceConfig(loss="kto", beta=0.4, desirable_weight=1.3, undesirable_weight=0.8)
    ours_loss, ours, ours_grads = _dstune(_model(ws, family), cfg, batch, lora)
    model = _model(ws, family)
    ref_model = None if lora else copy.deepcopy(model)
    policy = model if lora else _perturbed(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.KTOTrainer(model=policy, ref_model=ref_model,
                                 args=_args(trl.KTOConfig, tmp_path, beta=0.4, desirable_weight=1.3,
                                            undesirable_weight=0.8),
                                 train_dataset=_dataset(kto=True), processing_class=tok,
                                 peft_config=_lora_config(model) if lora else None)
    if lora:
        policy = trainer.model
        _set_peft_weights(policy)
    completion = lambda labels: (labels != IGNORE).long()  # noqa: E731
    trl_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                 "completion_mask": completion(batch["labels"]), "KL_input_ids": batch["kl_input_ids"],
                 "KL_attention_mask": batch["kl_attention_mask"], "KL_completion_mask": completion(batch["kl_labels"]),
                 "label": batch["desirable"]}
    theirs_loss = trainer.compute_loss(trainer.model, trl_batch)
    theirs_loss.backward()
    assert float(ours_loss) == pytest.approx(float(theirs_loss), abs=1e-5)
    _close(ours, _trl_metrics(trainer), ["kl", "rewards/chosen", "rewards/rejected", "logps/chosen",
                                         "logps/rejected"])
    _same_grads(ours_grads, _trl_grads(policy, lora))


def test_logps_are_the_reply_tokens_only(ws):
    """A pair's log-probabilities cover the reply (and its end-of-sequence token), never the prompt."""
    tok = _tokenizer(ws)
    batch = _pair_batch(tok)
    model = _model(ws, "llama").eval()
    logps = forward_logps(model, batch)
    reply = [len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for c in CHOSEN + REJECTED]
    assert logps.count.tolist() == reply
    assert isinstance(logps, Logps) and bool((logps.sum < 0).all())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("spec", [LORA, {**LORA, "use_dora": True}, {"name": "ia3"}, {"name": "adapter"},
                                  {"name": "prompt", "num_virtual_tokens": 3},
                                  {"name": "prefix", "num_virtual_tokens": 3, "gate": False},
                                  {"name": "prefix", "num_virtual_tokens": 3}],
                         ids=["lora", "dora", "ia3", "adapter", "prompt", "prefix", "gated-prefix"])
def test_every_method_that_leaves_the_base_frozen_steps_aside_to_the_base(ws, family, spec):
    """The reference `base` is the untouched base model's log-probabilities, whatever the method added (its
    weights moved away from their no-op start here), and the policy is not."""
    tok = _tokenizer(ws)
    batch = _pair_batch(tok)
    base = forward_logps(_model(ws, family).eval(), batch)
    model = _model(ws, family)
    methods = build_methods([spec])
    apply_methods(model, methods, "preference", tok)
    assert all(m.steps_aside for m in methods)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    stepped = SteppedAside().logps(model, batch)
    torch.testing.assert_close(stepped.sum, base.sum, atol=1e-5, rtol=1e-5)
    assert stepped.count.tolist() == base.count.tolist()
    assert (forward_logps(model, batch).sum - base.sum).abs().max() > 1e-3
