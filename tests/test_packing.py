"""Packed blocks compute what their documents compute alone: per-token losses and gradients, every method."""
from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F

from dstune.data.batching import IGNORE, collate, to_device
from dstune.data.packing import pack
from dstune.families import tiny_config
from dstune.methods import apply_methods, build_methods
from dstune.models.loading import auto_class
from dstune.tasks import get_task

SPECIAL = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
METHODS = {"full": {"name": "full"}, "lora": {"name": "lora", "r": 4},
           "prompt": {"name": "prompt", "num_virtual_tokens": 3},
           "prefix": {"name": "prefix", "num_virtual_tokens": 3}}
DOC_LENGTHS = [5, 9, 2, 7, 11, 4]  # best fit into blocks of 16: [11, 5] [9, 7] [4, 2]


def _model(family: str, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = auto_class("causal_lm").from_config(tiny_config(family, 100, SPECIAL), attn_implementation="sdpa")
    apply_methods(model, build_methods([METHODS[method]]), "causal_lm")
    for p in model.parameters():  # random (not zero) LoRA B and every trainable weight moved off its init
        if p.requires_grad:
            p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return model.float()


def _docs() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, 100, (n,), generator=g).tolist() for n in DOC_LENGTHS]


def _token_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of each predicted token [B, T-1], which of them are targets)."""
    batch = to_device(batch, "cpu", get_task("causal_lm"))
    labels = batch.pop("labels")
    logits = model(**batch).logits.float()[:, :-1]
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).clamp_min(0), reduction="none")
    return loss.view(target.shape), target != IGNORE


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_packed_block_equals_its_documents_alone(family, method):
    model = _model(family, method)
    docs = _docs()
    blocks = pack(datasets.Dataset.from_dict({"input_ids": docs, "labels": docs}), 16)
    assert [len(r) for r in blocks["input_ids"]] == [16, 16, 6]
    # packed: all blocks in one padded batch, no attention mask, positions restarting per document
    packed = collate(list(blocks), 0, get_task("causal_lm"))
    assert "attention_mask" not in packed
    loss_p, target_p = _token_losses(model, packed)
    by_doc = {}  # each document's target-token losses inside the packed batch, found by its tokens
    for b, row in enumerate(blocks):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for i, j in zip(starts, starts[1:]):
            by_doc[docs.index(row["input_ids"][i:j])] = loss_p[b, i:j - 1][target_p[b, i:j - 1]]
    losses_packed = torch.cat([by_doc[d] for d in range(len(docs))])
    # alone: each document by itself, the same targets (its first token is predicted from nothing)
    alone = [_token_losses(model, collate([{"input_ids": d, "labels": d}], 0, get_task("causal_lm"))) for d in docs]
    losses_alone = torch.cat([loss[mask] for loss, mask in alone])
    assert losses_packed.shape == losses_alone.shape == (sum(DOC_LENGTHS) - len(DOC_LENGTHS),)
    assert losses_packed.numel() == target_p.sum()  # no target crosses a document boundary
    torch.testing.assert_close(losses_packed, losses_alone, rtol=1e-5, atol=1e-5)
    # and the gradients of the summed token losses
    g_packed = _grads(model, losses_packed.sum())
    g_alone = _grads(model, losses_alone.sum())
    assert g_packed.keys() == g_alone.keys() and g_packed
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_alone[name], rtol=1e-5, atol=1e-5, msg=name)


def test_packing_without_it_leaks_across_documents():
    """The check above can fail: one position sequence for the whole block (no document boundaries)
    changes the second document's losses."""
    model = _model("llama", "full")
    block = pack(datasets.Dataset.from_dict({"input_ids": _docs(), "labels": _docs()}), 16)[0]
    joined = collate([{"input_ids": block["input_ids"], "labels": block["labels"]}], 0, get_task("causal_lm"))
    leaky, mask = _token_losses(model, joined)
    isolated, _ = _token_losses(model, collate([block], 0, get_task("causal_lm")))
    first = block["position_ids"].index(0, 1) - 1  # the first document's targets
    torch.testing.assert_close(leaky[mask][:first], isolated[mask][:first])
    assert (leaky[mask][first:] - isolated[mask][first:]).abs().max() > 1e-2


def test_packing_from_arrow_files_reads_them_in_order_and_packs_as_in_memory(tmp_path):
    """The prepared cache packs rows held in Arrow files by reading the files in order (windows spanning
    record batches and files); the blocks are those of packing the same rows in memory."""
    import random

    import datasets

    rng = random.Random(0)
    docs = [[rng.randrange(1, 99) for _ in range(rng.randint(1, 40))] for _ in range(2_345)]
    rows = {"input_ids": docs, "labels": [[IGNORE] * (len(d) // 2) + d[len(d) // 2:] for d in docs]}
    in_memory = pack(datasets.Dataset.from_dict(rows), 64, window=700)
    parts = [datasets.Dataset.from_dict({k: v[a:b] for k, v in rows.items()}).map(
        lambda x: x, cache_file_name=str(tmp_path / f"part{a}.arrow"), writer_batch_size=300)
        for a, b in [(0, 1000), (1000, 2345)]]
    on_disk = datasets.concatenate_datasets(parts)
    assert len(on_disk.cache_files) == 2
    from_files = pack(on_disk, 64, window=700, work=str(tmp_path))
    assert from_files.cache_files[0]["filename"] == str(tmp_path / "packed.arrow")
    assert from_files.to_dict() == in_memory.to_dict()
    assert sum(len(r) for r in from_files["input_ids"]) == sum(len(d) for d in docs)
