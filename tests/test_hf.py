"""Hugging Face ``transformers`` models used unmodified (issue 15, item 1): GPT-2 and a BERT classifier from tiny
configs (never downloaded), dict batches with ``attention_mask`` and ``-100`` labels, ``ModelOutput`` objects.

Ground truths are the models' own losses (``model(**batch).loss``), per-example autograd gradients through the
models' own 2-D mask handling, and a dense float64 GNH built from ``torch.autograd.functional.jacobian`` and
``hessian`` (independent of the package's products and solvers).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

from lightning_influence.evaluator import Evaluator  # noqa: E402
from lightning_influence.operators.curvature import gnh_product_reference, make_operator  # noqa: E402
from lightning_influence.tasks import Classification, LanguageModeling  # noqa: E402

VOCAB, LENGTH = 24, 8


def tiny_gpt2(attn: str = "eager", n_embd: int = 8, seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 from a config (about 2k parameters at n_embd=8), float64, eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=n_embd, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def tiny_bert(attn: str = "eager", num_labels: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16, num_labels=num_labels,
                                  pad_token_id=0, attn_implementation=attn)
    return transformers.BertForSequenceClassification(cfg).double().eval()


def lm_batch(n: int = 4, seed: int = 1) -> dict[str, Tensor]:
    """Right-padded sequences: real lengths LENGTH, LENGTH-3, LENGTH-1, ...; labels -100 on padding (HF style)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, LENGTH - (3 * i) % 5 :] = 0 if i else 1
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@contextmanager
def captured() -> Iterator[list[str]]:
    """Every Python warning and every ``transformers`` log record emitted inside the block."""
    messages: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler = _Handler(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught if "torch.jit.script" not in str(w.message))
    finally:
        logger.removeHandler(handler)


def _flat_grad(model: nn.Module, loss: Tensor) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
    return torch.cat(flat)


# ------------------------------------------------------------------------------------------ the tasks
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_language_modeling_matches_hf_causal_lm_loss_on_padded_dict_batches(attn: str) -> None:
    model, batch = tiny_gpt2(attn), lm_batch()
    task = LanguageModeling()
    with torch.no_grad():
        out, y = task(model, batch)
        ours = task.loss.mean(out, y)
        theirs = model(**batch).loss  # HF shifts logits[:, :-1] against labels[:, 1:] and ignores -100
    assert out.shape == (4, LENGTH - 1, VOCAB) and int((y != -100).sum()) == int(batch["attention_mask"][:, 1:].sum())
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=0)
    # without labels, the labels are the ids with masked positions ignored: the same loss
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        out2, y2 = task(model, no_labels)
    assert torch.equal(y2, y)
    torch.testing.assert_close(out2, out)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_classification_reads_bert_model_output_and_dict_labels(attn: str) -> None:
    model, batch = tiny_bert(attn), lm_batch()
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "token_type_ids": torch.zeros_like(batch["input_ids"]), "labels": torch.tensor([0, 2, 1, 2])}
    task = Classification()
    with torch.no_grad():
        out, y = task(model, batch)
        theirs = model(**batch).loss
    assert out.shape == (4, 3) and torch.equal(y, batch["labels"])
    torch.testing.assert_close(task.loss.mean(out, y), theirs)


def test_masked_tokens_count_in_neither_the_loss_nor_the_gnh() -> None:
    """Right padding: the GNH product of the padded batch equals that of the unpadded sequences, whatever the pads."""
    model, batch = tiny_gpt2(), lm_batch()
    task = LanguageModeling()
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    padded = gnh_product_reference(model, task, batch, v)
    other_pads = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)}
    torch.testing.assert_close(gnh_product_reference(model, task, other_pads, v), padded)
    lengths = batch["attention_mask"].sum(1).tolist()
    alone = sum(
        gnh_product_reference(model, task, {"input_ids": batch["input_ids"][i : i + 1, :n]}, v)
        for i, n in enumerate(lengths)
    )
    torch.testing.assert_close(padded, alone, rtol=1e-10, atol=1e-12)
    op = make_operator("gnh", model, task, [batch])
    torch.testing.assert_close(op.matvec(v), padded / sum(n - 1 for n in lengths))  # mean over counted tokens


@pytest.mark.parametrize("which", ["gpt2", "bert"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_torch_func_vmap_and_jvp_go_through_hf_models_without_mask_warnings(which: str, attn: str) -> None:
    """vmap per-example gradients equal autograd through the model's own 2-D mask handling; jvp/vjp products
    equal the operator's; no warning or transformers log record (about the attention mask or anything else)."""
    lm = which == "gpt2"
    model = tiny_gpt2(attn) if lm else tiny_bert(attn)
    batch = lm_batch()
    task: Any = LanguageModeling() if lm else Classification()
    if not lm:
        batch = {**batch, "labels": torch.tensor([0, 2, 1, 2])}
    ev = Evaluator(model, task)
    v = torch.randn(ev.num_params, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with captured() as messages:
        grads, losses = ev.per_example(batch)
        op = make_operator("gnh", model, task, [batch])
        for _ in range(3):
            prod = op.matvec(v)
        ref = gnh_product_reference(model, task, batch, v)
    assert messages == []
    assert ev._vectorised_grads  # vmap did not fall back to the loop
    for i in range(4):
        one = {k: t[i : i + 1] for k, t in batch.items()}
        logits = model(**{k: t for k, t in one.items() if k != "labels"}).logits  # HF's own 2-D mask handling
        if lm:  # HF's shift, summed over the counted tokens in float64 (HF's .loss is computed in float32)
            loss = F.cross_entropy(logits[0, :-1], one["labels"][0, 1:], ignore_index=-100, reduction="sum")
        else:
            loss = F.cross_entropy(logits, one["labels"], reduction="sum")
        torch.testing.assert_close(grads[i], _flat_grad(model, loss), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-12, atol=0)
    units = int((batch["labels"][:, 1:] != -100).sum()) if lm else 4
    torch.testing.assert_close(prod, ref / units, rtol=1e-9, atol=1e-12)
