"""Tiny models for tests: few enough parameters (< 200) for dense float64 Hessians and GNH matrices.

Every builder initialises its parameters from its own seed inside ``torch.random.fork_rng``, so building a
model is deterministic and never advances the global RNG. All are plain ``nn.Module`` and work in float64
(pass ``dtype=torch.float64`` or call ``.double()``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _build(factory, seed: int, dtype: torch.dtype | None) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    if dtype is not None:
        model = model.to(dtype)
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tiny_mlp(
    in_features: int = 4, hidden: int = 5, out: int = 3, *, seed: int = 0, dtype: torch.dtype | None = None
) -> nn.Sequential:
    """``Linear(in, hidden) -> tanh -> Linear(hidden, out)`` (43 parameters with the defaults)."""
    return _build(lambda: nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, out)), seed, dtype)


def tiny_cnn(*, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Sequential:
    """Inputs ``(N, 1, 6, 6)``: ``Conv2d(1, 2, 3) -> tanh -> flatten -> Linear(32, 3)`` (119 parameters)."""
    return _build(
        lambda: nn.Sequential(nn.Conv2d(1, 2, kernel_size=3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)),
        seed,
        dtype,
    )


class ManualLayerNorm(nn.Module):
    """LayerNorm over the last dimension written with ``mean`` / ``rsqrt`` (same parameters as ``nn.LayerNorm``).

    Used instead of ``nn.LayerNorm`` because the second derivative of the native kernel is wrong in torch 2.13.0
    (CPU, float64): the d/dx of d(loss)/d(weight) block of ``F.layer_norm``'s double backward disagrees with
    finite differences of its own gradient, so dense true Hessians of models containing it are asymmetric.
    Gradients and ``jvp`` of the native kernel are correct; only ground-truth Hessians are affected.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(dim=-1, keepdim=True)
        var = (x - mu).pow(2).mean(dim=-1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class TinyTransformerLM(nn.Module):
    """A one-block causal transformer language model written with plain tensor ops (171 parameters).

    Token and learned position embeddings, one residual causal self-attention block (attention written with
    ``matmul`` and ``softmax``, so it works under ``torch.func`` ``functional_call`` / ``jvp`` / ``vjp``), a
    hand-written LayerNorm (:class:`ManualLayerNorm`) and a linear head.
    Input ``(N, T)`` token ids with ``T <= seq_len``; output ``(N, T, vocab)`` logits.

    Args:
        vocab: Vocabulary size.
        d_model: Embedding width.
        n_heads: Number of attention heads (must divide ``d_model``).
        seq_len: Maximal sequence length (size of the position table and the causal mask).
    """

    def __init__(self, vocab: int = 7, d_model: int = 4, n_heads: int = 1, seq_len: int = 5) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model}")
        self.vocab, self.d_model, self.n_heads, self.seq_len = vocab, d_model, n_heads, seq_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.1 * torch.randn(seq_len, d_model))
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm = ManualLayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("causal", torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool)), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        n, t = ids.shape
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds seq_len={self.seq_len}")
        x = self.tok(ids) + self.pos[:t]
        q, k, v = self.qkv(x).split(self.d_model, dim=-1)
        hd = self.d_model // self.n_heads

        def heads(z: Tensor) -> Tensor:
            return z.reshape(n, t, self.n_heads, hd).transpose(1, 2)  # (N, H, T, hd)

        scores = heads(q) @ heads(k).transpose(-2, -1) / math.sqrt(hd)
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ heads(v)  # (N, H, T, hd)
        x = x + self.proj(attn.transpose(1, 2).reshape(n, t, self.d_model))
        return self.head(self.norm(x))


def tiny_transformer_lm(
    vocab: int = 7,
    d_model: int = 4,
    n_heads: int = 1,
    seq_len: int = 5,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> TinyTransformerLM:
    """A seeded :class:`TinyTransformerLM`."""
    return _build(lambda: TinyTransformerLM(vocab, d_model, n_heads, seq_len), seed, dtype)


class BNDropoutNet(nn.Module):
    """``Linear -> BatchNorm1d -> tanh -> Dropout -> Linear`` (63 parameters with the defaults).

    For checking that estimators switch the module to eval mode (BatchNorm running stats, no dropout) and
    restore the caller's mode afterwards.
    """

    def __init__(self, in_features: int = 4, hidden: int = 6, out: int = 3, p: float = 0.5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


def bn_dropout_net(
    in_features: int = 4,
    hidden: int = 6,
    out: int = 3,
    p: float = 0.5,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> BNDropoutNet:
    """A seeded :class:`BNDropoutNet`."""
    return _build(lambda: BNDropoutNet(in_features, hidden, out, p), seed, dtype)
