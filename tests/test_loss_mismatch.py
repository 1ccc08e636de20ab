"""Loss mismatch (issue 15, item 3): label smoothing as a supported loss option (checked against dense float64
autograd), and a LossMismatchWarning when the module trains on another loss than the task's."""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence.callbacks._loss import check_loss_matches, loss_mismatches
from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
from lightning_influence.callbacks.influence_report import InfluenceReport
from lightning_influence.exceptions import ConfigurationError, LossMismatchWarning
from lightning_influence.influence import influence_scores
from lightning_influence.losses import SoftmaxCrossEntropy
from lightning_influence.operators.curvature import make_operator
from lightning_influence.tasks import Classification, LanguageModeling

EPS = 0.15


def _data(n: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4)).double()


def _flat_fn(model: nn.Module) -> tuple[Tensor, Any]:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def out(th: Tensor, x: Tensor) -> Tensor:
        parts = torch.split(th, [s.numel() for s in shapes])
        tree = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return torch.func.functional_call(model, tree, (x,))

    return theta, out


# ------------------------------------------------------------------------------------- the loss option
def test_label_smoothed_cross_entropy_matches_torch_and_dense_float64_autograd() -> None:
    loss = SoftmaxCrossEntropy(label_smoothing=EPS)
    h = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, -100, 1, 2])
    keep = y != -100
    torch.testing.assert_close(loss.unit_losses(h, y)[keep],
                               F.cross_entropy(h, y, label_smoothing=EPS, reduction="none")[keep])
    grad = torch.func.grad(lambda z: F.cross_entropy(z, y, label_smoothing=EPS, reduction="sum"))(h)
    torch.testing.assert_close(loss.output_grad(h, y), grad)  # p - q, zero at the ignored unit
    v = torch.randn_like(h)
    for i in range(5):  # the output Hessian of the smoothed loss is plain CE's diag(p) - pp^T
        H = torch.autograd.functional.hessian(lambda z, i=i: F.cross_entropy(z, y[i], label_smoothing=EPS), h[i])
        expected = H @ v[i] if keep[i] else torch.zeros(4, dtype=torch.float64)
        torch.testing.assert_close(loss.output_hvp(h, y, v)[i], expected)
    with pytest.raises(ConfigurationError, match="label_smoothing must lie in"):
        SoftmaxCrossEntropy(label_smoothing=1.0)
    with pytest.raises(ConfigurationError, match="drop label_smoothing"):
        Classification("binary", label_smoothing=0.1)
    assert LanguageModeling(label_smoothing=EPS).loss.label_smoothing == EPS


def test_label_smoothed_gnh_hessian_and_influence_match_dense_float64() -> None:
    model, (x, y) = _mlp(), _data()
    task = Classification(label_smoothing=EPS)
    theta, out = _flat_fn(model)

    def mean_loss(th: Tensor) -> Tensor:
        return F.cross_entropy(out(th, x), y, label_smoothing=EPS)

    J = torch.autograd.functional.jacobian(lambda th: out(th, x), theta)  # (N, K, P)
    h = out(theta, x).detach()
    S = torch.stack([torch.autograd.functional.hessian(lambda z, i=i: F.cross_entropy(z, y[i], label_smoothing=EPS),
                                                       h[i]) for i in range(len(y))])
    G = torch.einsum("nkp,nkl,nlq->pq", J, S, J) / len(y)
    torch.testing.assert_close(make_operator("gnh", model, task, [(x, y)]).dense(), G, rtol=1e-10, atol=1e-12)
    Hfull = torch.autograd.functional.hessian(mean_loss, theta)
    torch.testing.assert_close(make_operator("hessian", model, task, [(x, y)]).dense(), Hfull, rtol=1e-8, atol=1e-10)
    # influence: the gradients are those of the smoothed loss, the curvature the GNH
    damping = 0.1
    grads = torch.stack([torch.func.grad(lambda th, i=i: F.cross_entropy(out(th, x[i : i + 1]), y[i : i + 1],
                                                                            label_smoothing=EPS))(theta)
                         for i in range(len(y))])
    truth = -grads[:3] @ torch.linalg.solve(G + damping * torch.eye(len(theta), dtype=torch.float64), grads.T)
    res = influence_scores(model, task, (x, y), (x[:3], y[:3]), solver="exact", damping=damping,
                           self_influence=False)
    torch.testing.assert_close(res.scores, truth, rtol=1e-8, atol=1e-10)
    plain = influence_scores(model, Classification(), (x, y), (x[:3], y[:3]), solver="exact", damping=damping,
                             self_influence=False)
    assert (plain.scores - truth).abs().max() > 1e-3 * truth.abs().max()  # smoothing matters: the test can fail


# ----------------------------------------------------------------------------------------- the warning
class _Module(L.LightningModule):
    def __init__(self, criterion: str = "plain") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4)).double()
        self.criterion = criterion
        if criterion == "smoothing":
            self.loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        elif criterion == "weights":
            self.loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 1.0, 0.5], dtype=torch.float64))
        else:
            self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        if self.criterion == "focal":  # a custom loss, no loss module to inspect: caught by its value
            logp = torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
            loss = (-(1 - logp.exp()) ** 2 * logp).mean()
        else:
            loss = self.loss_fn(logits, y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _mismatch_warnings(criterion: str, task: Classification) -> list[str]:
    x, y = _data(16)
    trainer = SimpleNamespace(train_dataloader=DataLoader(TensorDataset(x, y), batch_size=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_loss_matches(trainer, _Module(criterion), task, "InfluenceReport")  # type: ignore[arg-type]
    return [str(w.message) for w in caught if issubclass(w.category, LossMismatchWarning)]


@pytest.mark.parametrize(("criterion", "phrase"), [
    ("smoothing", "Classification(label_smoothing=0.1)"),
    ("weights", "class weights"),
    ("focal", "training_step returns loss"),
])
def test_loss_mismatch_warning_fires_and_names_the_assumed_loss_and_the_fix(criterion: str, phrase: str) -> None:
    messages = _mismatch_warnings(criterion, Classification())
    assert len(messages) == 1, messages
    assert phrase in messages[0] and "SoftmaxCrossEntropy(ignore_index=-100, label_smoothing=0.0)" in messages[0]
    assert "Declare the loss actually used on the task" in messages[0]


def test_no_warning_for_plain_cross_entropy_or_a_declared_label_smoothing() -> None:
    assert _mismatch_warnings("plain", Classification()) == []
    assert _mismatch_warnings("smoothing", Classification(label_smoothing=0.1)) == []  # value agrees too
    x, y = _data(8)
    assert loss_mismatches(_Module("smoothing"), Classification(label_smoothing=0.1), (x, y)) == []
    assert len(loss_mismatches(_Module("smoothing"), Classification(label_smoothing=0.3), (x, y))) == 2


@pytest.mark.parametrize("criterion", ["plain", "smoothing"])
def test_every_callback_checks_once_in_a_fit_before_training(criterion: str, tmp_path: Any) -> None:
    x, y = _data(16)
    task = Classification()
    callbacks = [CurvatureMonitor(task, sample_size=8, batch_size=8, trace_probes=2, lanczos_iter=3,
                                  every_n_steps=1, on_checkpoint=False, log_figure=False, write_report=False),
                 InfluenceReport(task, query_data=TensorDataset(x[:2], y[:2]), solver="cg", damping=0.1,
                                 self_influence=False, images=False, progress_bar=False)]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        callbacks=callbacks)
    module = _Module(criterion)
    before = [p.detach().clone() for p in module.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    found = [str(w.message) for w in caught if issubclass(w.category, LossMismatchWarning)]
    assert len(found) == (1 if criterion == "smoothing" else 0), found  # once, although two callbacks ask
    assert found == [] or found[0].startswith("CurvatureMonitor:")
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))  # it trained
