"""Hugging Face ``transformers`` models used unmodified (issue 15, item 1): GPT-2 and a BERT classifier from tiny
configs (never downloaded), dict batches with ``attention_mask`` and ``-100`` labels, ``ModelOutput`` objects.

Ground truths are the models' own losses (``model(**batch).loss``), per-example autograd gradients through the
models' own 2-D mask handling, and a dense float64 GNH built from ``torch.autograd.functional.jacobian`` and
``hessian`` (independent of the package's products and solvers).
"""

from __future__ import annotations

import logging
import math
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
from lightning_influence.operators import gnh_product_reference, make_operator  # noqa: E402
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


# ------------------------------------------------------------------- must show: a generated continuation
def _dense_influence(model: nn.Module, train: list[dict[str, Tensor]], query: dict[str, Tensor],
                     damping: float) -> Tensor:
    r"""Independent float64 influence: :math:`G = \frac1N\sum_t J_t^\top (\nabla^2_h \ell_t) J_t` from
    ``autograd.functional.jacobian`` of the logits and ``hessian`` of each token's CE (HF's own 2-D mask path),
    a dense solve, and autograd gradients of the summed token losses; :math:`-\nabla\ell(q)^\top(G+\lambda I)^{-1}
    \nabla\ell(z)`."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])

    def tree(theta: Tensor) -> dict[str, Tensor]:
        parts = torch.split(theta, [s.numel() for s in shapes])
        return {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}

    def logits(theta: Tensor, seq: dict[str, Tensor]) -> Tensor:
        kw = {"input_ids": seq["input_ids"][None], "attention_mask": seq["attention_mask"][None]}
        return torch.func.functional_call(model, tree(theta), (), kw).logits[0, :-1]  # HF's shift

    def seq_loss(theta: Tensor, seq: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(logits(theta, seq), seq["labels"][1:], ignore_index=-100, reduction="sum")

    p = theta0.numel()
    jacobians, curvatures = [], []
    for seq in train:
        keep = seq["labels"][1:] != -100
        J = torch.autograd.functional.jacobian(lambda th, s=seq, k=keep: logits(th, s)[k], theta0, vectorize=True)
        with torch.no_grad():
            h = logits(theta0, seq)[keep]
        for t, y in enumerate(seq["labels"][1:][keep]):
            H = torch.autograd.functional.hessian(lambda z, y=y: F.cross_entropy(z, y), h[t])
            jacobians.append(J[t])
            curvatures.append(H @ J[t])
    tokens = len(jacobians)
    G = torch.cat(jacobians).T @ torch.cat(curvatures)  # sum_t J_t^T H_t J_t
    G /= tokens
    gq = torch.func.grad(seq_loss)(theta0, query)
    x = torch.linalg.solve(G + damping * torch.eye(p, dtype=torch.float64), gq)
    return torch.stack([-(x @ torch.func.grad(seq_loss)(theta0, seq)) for seq in train])


def _greedy_query(model: nn.Module, prompt: Tensor, new_tokens: int) -> dict[str, Tensor]:
    """A greedy continuation from ``model.generate``; the prompt's labels are -100 (only generated tokens count)."""
    with torch.no_grad():
        full = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)[0]
    labels = full.clone()
    labels[: len(prompt)] = -100
    return {"input_ids": full, "attention_mask": torch.ones_like(full), "labels": labels}


@pytest.mark.timeout(120)
def test_influence_on_a_generated_continuation_matches_a_dense_float64_computation() -> None:
    from lightning_influence.influence import influence_scores

    model = tiny_gpt2()
    batch = lm_batch(5, seed=5)
    train = [{k: v[i] for k, v in batch.items()} for i in range(5)]
    query = _greedy_query(model, torch.tensor([3, 9, 4, 11]), new_tokens=3)
    assert query["input_ids"].shape == (7,) and int((query["labels"] != -100).sum()) == 3
    damping = 0.05
    truth = _dense_influence(model, train, query, damping)
    assert float(truth.abs().min()) > 0 and len(set(torch.sign(truth).tolist())) == 2  # a non-trivial pattern
    for solver in ("exact", "cg"):
        result = influence_scores(model, LanguageModeling(), train, [query], solver=solver, damping=damping,
                                  self_influence=False, batch_size=5, cg_rtol=1e-12)
        assert result.scores.shape == (1, 5)
        torch.testing.assert_close(result.scores[0], truth, rtol=1e-6, atol=1e-9 * float(truth.abs().max()))


# ---------------------------------------------------------------------- must show: BERT in a Lightning fit
class BertClassifier(__import__("lightning").LightningModule):
    """The HF model unmodified inside a LightningModule; ``forward(**batch)`` passes the dict batch through."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert().train()  # dropout on while training; the callbacks measure in eval mode

    def forward(self, **batch: Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _bert_data(n: int, seed: int) -> list[dict[str, Tensor]]:
    b = lm_batch(n, seed=seed)
    labels = (b["input_ids"][:, 0] % 3).long()  # learnable from the first token
    return [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i], "labels": labels[i]}
            for i in range(n)]


@pytest.mark.timeout(180)
def test_bert_classifier_runs_with_every_callback_in_a_lightning_fit(tmp_path: Any) -> None:
    """CurvatureMonitor, InfluenceReport and ApproximateCV on the unmodified HF classifier in a real fit, with no
    attention-mask or vmap-fallback warning. (PBRFValidation also runs on it but costs ~70 s of train end on this
    2k-parameter model: left out here.)"""
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_influence.callbacks.approximate_cv import ApproximateCV
    from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
    from lightning_influence.callbacks.influence_report import InfluenceReport

    task = Classification()
    train, val = _bert_data(12, seed=7), _bert_data(4, seed=8)
    monitor = CurvatureMonitor(task, sample_size=12, batch_size=6, trace_probes=4, lanczos_iter=6, every_n_epochs=1,
                               on_checkpoint=False, log_figure=False, write_report=False)
    report = InfluenceReport(task, query_data=val, solver="cg", damping=1.0, top_k=2, max_queries=2,
                             self_influence=False, images=False, progress_bar=False)
    acv = ApproximateCV(task, folds=2, solver="cg", damping=0.1, report=False)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        callbacks=[monitor, report, acv])
    module = BertClassifier()
    with captured() as messages:
        trainer.fit(module, DataLoader(train, batch_size=6))
    assert not [m for m in messages if "mask" in m.lower() or "vmap" in m.lower()], messages
    assert monitor.latest is not None and monitor.latest.trace > 0
    assert 0 < monitor.latest.lambda_max <= monitor.latest.trace * (1 + 1e-6)
    assert report.result is not None and report.result.scores.shape == (2, 12)
    assert torch.isfinite(report.result.scores).all() and report.result.solve["converged"]
    assert acv.last_result is not None and math.isfinite(acv.last_result.estimate) and acv.last_result.estimate > 0


def test_is_hf_model_walks_the_module_tree_once_per_instance() -> None:
    from types import SimpleNamespace

    from lightning_influence.tasks import is_hf_model

    class Counting(torch.nn.Module):
        def __init__(self, hf: bool) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)
            if hf:
                self.inner.config = SimpleNamespace(_attn_implementation="eager")  # what HF models carry
            self.walks = 0

        def modules(self):  # type: ignore[no-untyped-def, override]
            self.walks += 1
            return super().modules()

    hf, plain = Counting(True), Counting(False)
    assert [is_hf_model(hf) for _ in range(3)] == [True] * 3 and hf.walks == 1
    assert [is_hf_model(plain) for _ in range(3)] == [False] * 3 and plain.walks == 1
