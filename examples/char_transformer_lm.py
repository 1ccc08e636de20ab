"""A tiny character-level transformer LM on text that ships with Python; which training windows drove a generation.

The corpus is the docstrings of a few standard-library modules plus the Zen of Python (``this``), a few KB that
exist on every Python install (no download). Training sequences are non-overlapping windows of ``--context``
characters as aligned ``(input_ids, labels)`` pairs; the last window is padded with labels at ``ignore_index``
(-100), which :class:`~lightning_influence.tasks.LanguageModeling` excludes from the token-level cross-entropy and
from the curvature (one curvature unit = one token).

After training, the model continues a prompt greedily. The query is that continuation: the prompt's labels are
``ignore_index``, so the query loss is the loss of the generated characters only.
:class:`~lightning_influence.callbacks.influence_report.InfluenceReport` (Fisher-CG on the damped GNH) scores every
training window; the printout shows the strongest proponents (windows whose upweighting makes the generated text
more likely) and opponents.

Run::

    python examples/char_transformer_lm.py                     # a minute or two on a laptop CPU
    python examples/char_transformer_lm.py --max-epochs 2 --max-train 32   # smoke-test size

The report lands in ``<out>/lightning_logs/version_*/influence/report.html``.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import io
import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
from lightning_influence.callbacks.influence_report import InfluenceReport
from lightning_influence.tasks import LanguageModeling

IGNORE = -100
MODULES = ("textwrap", "json", "string", "shlex", "fnmatch", "glob")


def corpus() -> str:
    """The Zen of Python and a few stdlib module docstrings (always installed, never downloaded)."""
    with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        this = importlib.import_module("this")
    parts = [codecs.decode(this.s, "rot13")]
    parts += [importlib.import_module(m).__doc__ or "" for m in MODULES]
    return "\n\n".join(p.strip() for p in parts if p.strip())


class Vocab:
    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> Tensor:
        return torch.tensor([self.index[c] for c in text if c in self.index], dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist() if 0 <= i < len(self.chars))


def windows(ids: Tensor, context: int) -> TensorDataset:
    """Non-overlapping windows as aligned ``(input_ids, labels)`` pairs; the last one padded with ignore_index."""
    n = math.ceil((len(ids) - 1) / context)
    inputs = torch.zeros(n, context, dtype=torch.long)
    labels = torch.full((n, context), IGNORE, dtype=torch.long)
    for w in range(n):
        x = ids[w * context : w * context + context]
        y = ids[w * context + 1 : w * context + context + 1]
        inputs[w, : len(x)] = x
        labels[w, : len(y)] = y
    return TensorDataset(inputs, labels)


class CharTransformer(L.LightningModule):
    """One pre-norm causal self-attention block + MLP (attention written with matmul/softmax for torch.func)."""

    def __init__(self, vocab: int, context: int = 32, d_model: int = 32, n_heads: int = 2, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(context, d_model))
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("causal", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        n, t = ids.shape
        h, d = self.hparams.n_heads, self.hparams.d_model
        x = self.tok(ids) + self.pos[:t]
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(n, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // h)
        att = att.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        x = x + self.mlp(self.ln2(x))
        return self.head(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ids, labels = batch
        logits = self(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)

    @torch.no_grad()
    def generate(self, prompt: Tensor, steps: int) -> Tensor:
        ids = prompt.clone()
        for _ in range(steps):
            logits = self(ids[-self.hparams.context :].unsqueeze(0))[0, -1]
            ids = torch.cat([ids, logits.argmax().view(1)])
        return ids


def query_dataset(prompt: Tensor, generated: Tensor, context: int) -> TensorDataset:
    """The generated continuation as one aligned query; prompt positions are ignore_index."""
    full = generated[-(context + 1) :]
    n_prompt = max(0, len(prompt) - (len(generated) - len(full)))
    inputs, labels = full[:-1].clone(), full[1:].clone()
    labels[: max(0, n_prompt - 1)] = IGNORE
    return TensorDataset(inputs.unsqueeze(0), labels.unsqueeze(0))


class GenerateQuery(L.Callback):
    """At train end, continue the prompt greedily and hand the continuation to InfluenceReport as its query.

    Must come before InfluenceReport in ``callbacks``: InfluenceReport reads ``query_data`` in its own
    ``on_train_end``.
    """

    def __init__(self, report: InfluenceReport, vocab: Vocab, prompt: str, steps: int, context: int) -> None:
        self.report, self.vocab, self.prompt, self.steps, self.context = report, vocab, prompt, steps, context
        self.continuation = ""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        p = self.vocab.encode(self.prompt)
        generated = pl_module.generate(p, self.steps)  # type: ignore[operator]
        pl_module.train(was_training)
        self.continuation = self.vocab.decode(generated[len(p) :])
        self.report.query_data = query_dataset(p, generated, self.context)


def run(max_epochs: int = 30, context: int = 32, max_train: int | None = None, prompt: str = "Beautiful is ",
        steps: int = 16, out: str = "runs/char_lm", seed: int = 0, top_k: int = 3) -> dict[str, Any]:
    L.seed_everything(seed, workers=True, verbose=False)
    text = corpus()
    vocab = Vocab(text)
    train = windows(vocab.encode(text), context)
    model = CharTransformer(len(vocab.chars), context=context)
    task = LanguageModeling(ignore_index=IGNORE)
    monitor = CurvatureMonitor(task, every_n_epochs=max(1, max_epochs // 3), on_checkpoint=False, sample_size=32,
                               batch_size=32)
    # Influence of the training windows on the generated continuation (Fisher-CG on the damped token-level GNH).
    report = InfluenceReport(task, query_data=train, solver="cg", damping=1e-2, top_k=top_k, max_train=max_train,
                             self_influence=False, images=False, progress_bar=False)
    generate = GenerateQuery(report, vocab, prompt, steps, context)
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, default_root_dir=out,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        log_every_n_steps=5, callbacks=[monitor, generate, report])
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed)))
    result = report.result
    assert result is not None
    scores = result.scores[0]
    order = torch.argsort(scores)
    print(f"\n{len(train)} training windows of {context} characters ({len(text)} characters of stdlib text)")
    print(f"prompt {prompt!r} -> generated {generate.continuation!r}   ({time.perf_counter() - start:.0f} s)")
    if monitor.latest is not None:
        print(f"curvature: trace {monitor.latest.trace:.3g}, lambda_max {monitor.latest.lambda_max:.3g}")
    for label, idx in (("proponents (negative: upweighting lowers the query loss)", order[:top_k]),
                       ("opponents", order.flip(0)[:top_k])):
        print(label)
        for j in idx.tolist():
            window = int(result.train_indices[j])
            print(f"  {float(scores[j]):+.3e}  window {window}: {vocab.decode(train[window][0])!r}")
    html = report.scores_path.parent / "report.html" if report.scores_path else None
    print(f"report: {html}")
    return {"continuation": generate.continuation, "scores": scores, "train_indices": result.train_indices,
            "report": html, "num_train": len(train), "solve": result.solve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--max-train", type=int, default=None, help="score a seeded subset of training windows")
    parser.add_argument("--prompt", default="Beautiful is ")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default="runs/char_lm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run(args.max_epochs, args.context, args.max_train, args.prompt, args.steps, args.out, args.seed)


if __name__ == "__main__":
    main()
