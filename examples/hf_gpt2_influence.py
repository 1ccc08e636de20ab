"""A Hugging Face GPT-2 from a tiny ``GPT2Config`` (never downloaded), used unmodified: which lines drove a generation.

The corpus is the Zen of Python (``import this``, shipped with every Python), one line per training sequence,
character-level. Batches are what a Hugging Face user already has: dicts with ``input_ids``, ``attention_mask``
and ``labels`` right-padded with -100. The LightningModule holds ``GPT2LMHeadModel`` as is and trains on its own
``.loss``; :class:`~lightning_influence.tasks.LanguageModeling` reads the ``ModelOutput``'s ``.logits``, shifts
them as Hugging Face does (``logits[:, :-1]`` against ``labels[:, 1:]``), and leaves masked tokens out of the
loss and of the curvature.

Callbacks: :class:`~lightning_influence.callbacks.curvature_monitor.CurvatureMonitor` (trace and top eigenvalues
of the token-level GNH during training), :class:`~lightning_influence.callbacks.influence_report.InfluenceReport`
(influence of every line on a greedy continuation of a prompt, Fisher-CG on the damped GNH),
:class:`~lightning_influence.callbacks.approximate_cv.ApproximateCV` (approximate K-fold CV of the token loss) and,
with ``--pbrf``, :class:`~lightning_influence.callbacks.pbrf_validation.PBRFValidation` (the PBRF ground truth for
a few pairs; minutes on a CPU).

Run::

    python examples/hf_gpt2_influence.py                    # about a minute on a laptop CPU
    python examples/hf_gpt2_influence.py --max-epochs 2 --steps 4   # smoke-test size

The report lands in ``<out>/lightning_logs/version_*/influence/report.html`` (printed at the end).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import io
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_influence.callbacks.approximate_cv import ApproximateCV
from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
from lightning_influence.callbacks.influence_report import InfluenceReport
from lightning_influence.callbacks.pbrf_validation import PBRFValidation
from lightning_influence.tasks import LanguageModeling

IGNORE = -100
PAD = 0  # token id 0 is reserved for padding (never a character)


def zen_lines() -> list[str]:
    """The Zen of Python, one aphorism per line (always installed, never downloaded)."""
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        this = importlib.import_module("this")
    text = codecs.decode(this.s, "rot13")
    return [line.strip() for line in text.splitlines()[2:] if line.strip()]


class CharTokenizer:
    """Characters to ids 1..V (0 is the pad id)."""

    def __init__(self, lines: list[str]) -> None:
        self.chars = sorted(set("".join(lines)))
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> Tensor:
        return torch.tensor([self.index[c] for c in text if c in self.index], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i - 1] for i in ids.tolist() if 1 <= i <= len(self.chars))


def padded_dataset(tok: CharTokenizer, lines: list[str], length: int) -> list[dict[str, Tensor]]:
    """Hugging Face style examples: right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads)."""
    data = []
    for line in lines:
        ids = tok.encode(line)[:length]
        input_ids = torch.full((length,), PAD, dtype=torch.long)
        input_ids[: len(ids)] = ids
        mask = (torch.arange(length) < len(ids)).long()
        labels = input_ids.masked_fill(mask == 0, IGNORE)
        data.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return data


class HFGPT2(L.LightningModule):
    """``GPT2LMHeadModel`` from a tiny config, unmodified; ``forward(**batch)`` passes the dict batch through."""

    def __init__(self, vocab_size: int, n_positions: int = 64, n_embd: int = 32, n_layer: int = 2,
                 lr: float = 3e-3) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.save_hyperparameters()
        config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=2,
                            bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
        self.model = GPT2LMHeadModel(config)

    def forward(self, **batch: Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(**batch).loss  # Hugging Face's own shifted, -100-masked token cross-entropy
        self.log("train_loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)


def continuation_query(generated: Tensor, prompt_len: int) -> list[dict[str, Tensor]]:
    """The generated text as one query: the prompt's labels are -100, so only generated tokens count."""
    labels = generated.clone()
    labels[:prompt_len] = IGNORE
    return [{"input_ids": generated, "attention_mask": torch.ones_like(generated), "labels": labels}]


class GenerateQuery(L.Callback):
    """At train end, continue the prompt greedily (``model.generate``) and hand it to InfluenceReport as its query.

    Must come before InfluenceReport in ``callbacks``: InfluenceReport reads ``query_data`` in its own
    ``on_train_end``.
    """

    def __init__(self, report: InfluenceReport, tok: CharTokenizer, prompt: str, steps: int) -> None:
        self.report, self.tok, self.prompt, self.steps = report, tok, prompt, steps
        self.continuation = ""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        p = self.tok.encode(self.prompt)
        with torch.no_grad():
            generated = pl_module.model.generate(  # type: ignore[operator]
                p[None], attention_mask=torch.ones_like(p)[None], max_new_tokens=self.steps, do_sample=False,
                pad_token_id=PAD,
            )[0]
        pl_module.train(was_training)
        self.continuation = self.tok.decode(generated[len(p) :])
        self.report.query_data = continuation_query(generated, len(p))


def run(max_epochs: int = 40, length: int = 48, steps: int = 12, prompt: str = "Beautiful is ",
        out: str = "runs/hf_gpt2", seed: int = 0, top_k: int = 3, n_embd: int = 32, folds: int = 3,
        pbrf: bool = False, max_lines: int | None = None) -> dict[str, Any]:
    L.seed_everything(seed, workers=True, verbose=False)
    lines = zen_lines()[:max_lines]
    tok = CharTokenizer(lines)
    train = padded_dataset(tok, lines, length)
    model = HFGPT2(tok.vocab_size, n_positions=max(64, length + steps), n_embd=n_embd)
    task = LanguageModeling(ignore_index=IGNORE)
    monitor = CurvatureMonitor(task, every_n_epochs=max(1, max_epochs // 2), on_checkpoint=False,
                               sample_size=len(train), batch_size=len(train), trace_probes=4, lanczos_iter=8)
    report = InfluenceReport(task, query_data=train[:1], solver="cg", damping=1e-1, top_k=top_k, self_influence=False,
                             images=False, progress_bar=False)
    callbacks: list[L.Callback] = [monitor, GenerateQuery(report, tok, prompt, steps), report,
                                   ApproximateCV(task, folds=folds, curvature="gnh", solver="cg", damping=1e-1)]
    if pbrf:
        callbacks.append(PBRFValidation(task, num_train=3, num_queries=1, exact_max_params=0))
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, default_root_dir=out,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        log_every_n_steps=1, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed)))
    result = report.result
    assert result is not None
    generate = callbacks[1]
    assert isinstance(generate, GenerateQuery)
    scores = result.scores[0]
    order = torch.argsort(scores)
    print(f"\n{len(train)} lines of the Zen of Python; GPT-2 with {sum(p.numel() for p in model.parameters())} "
          f"parameters ({time.perf_counter() - start:.0f} s)")
    print(f"prompt {prompt!r} -> generated {generate.continuation!r}")
    if monitor.latest is not None:
        print(f"curvature: trace {monitor.latest.trace:.3g}, lambda_max {monitor.latest.lambda_max:.3g}")
    for label, idx in (("proponents (negative: upweighting lowers the query loss)", order[:top_k]),
                       ("opponents", order.flip(0)[:top_k])):
        print(label)
        for j in idx.tolist():
            print(f"  {float(scores[j]):+.3e}  {lines[int(result.train_indices[j])]!r}")
    html = report.scores_path.parent / "report.html" if report.scores_path else None
    print(f"report: {html}")
    return {"continuation": generate.continuation, "scores": scores, "train_indices": result.train_indices,
            "report": html, "num_train": len(train), "solve": result.solve, "monitor": monitor,
            "cv": callbacks[3].last_result}  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--length", type=int, default=48, help="padded sequence length (characters)")
    parser.add_argument("--steps", type=int, default=12, help="generated characters")
    parser.add_argument("--prompt", default="Beautiful is ")
    parser.add_argument("--out", default="runs/hf_gpt2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-embd", type=int, default=32)
    parser.add_argument("--max-lines", type=int, default=None, help="train on the first lines only")
    parser.add_argument("--pbrf", action="store_true", help="also run PBRFValidation (minutes on a CPU)")
    args = parser.parse_args()
    run(args.max_epochs, args.length, args.steps, args.prompt, args.out, args.seed, n_embd=args.n_embd, pbrf=args.pbrf,
        max_lines=args.max_lines)


if __name__ == "__main__":
    main()
