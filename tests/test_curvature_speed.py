"""Curvature at training speed: warm-started Lanczos, the monitor's warm start across a resume (issue 12)."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_influence.callbacks.curvature_monitor import CurvatureMonitor
from lightning_influence.operators import GNHOperator, make_operator
from lightning_influence.spectrum import lanczos_lambda_max
from lightning_influence.tasks import Classification
from tests.helpers.lightning_models import TinyClassifier, synthetic_classification
from tests.helpers.models import tiny_mlp

SMALL = {"sample_size": 20, "batch_size": 8, "trace_probes": 4, "lanczos_iter": 8}


def _trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", devices=1, num_sanity_val_steps=0, logger=False, limit_val_batches=0,
                      **kwargs)


# ------------------------------------------------------------------------------------------ Lanczos
def test_warm_start_reaches_one_percent_in_fewer_products_on_drifting_checkpoints() -> None:
    ds = synthetic_classification(48, seed=3)
    x, y = ds.tensors
    model = tiny_mlp(hidden=8, dtype=torch.float64, seed=1)
    batches = [(x[:24], y[:24]), (x[24:], y[24:])]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cold_total = warm_total = 0
    previous = None
    for _ in range(6):  # six checkpoints, a few SGD steps apart: the top eigenvector drifts slowly
        op = GNHOperator(model, Classification(), batches)
        exact = float(torch.linalg.eigvalsh(op.dense())[-1])
        cold = lanczos_lambda_max(op, 60, tol=1e-3, seed=7)
        assert abs(cold.value - exact) <= 0.01 * exact
        if previous is not None:
            warm = lanczos_lambda_max(op, 60, tol=1e-3, seed=7, start=previous)
            assert abs(warm.value - exact) <= 0.01 * exact
            assert warm.vector is not None and abs(float(warm.vector.norm()) - 1.0) < 1e-12
            cold_total += cold.num_products
            warm_total += warm.num_products
        previous = cold.vector
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert warm_total < cold_total, (warm_total, cold_total)


def test_lanczos_ritz_vector_is_the_top_eigenvector() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    a = a @ a.T
    from lightning_influence.spectrum import DenseOperator

    est = lanczos_lambda_max(DenseOperator(a), 30, tol=1e-10)
    evals, evecs = torch.linalg.eigh(a)
    assert abs(est.value - float(evals[-1])) < 1e-9 * float(evals[-1])
    assert est.vector is not None and abs(abs(float(est.vector @ evecs[:, -1])) - 1) < 1e-8


# ------------------------------------------------------------------------------------------ monitor
def test_resumed_run_warm_starts_from_the_checkpointed_vector(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = CurvatureMonitor(Classification(), every_n_steps=3, **SMALL)  # type: ignore[arg-type]
        ckpt = ModelCheckpoint(dirpath=tmp_path / "a", save_top_k=-1, every_n_epochs=1)  # 4 steps per epoch
        _trainer(tmp_path / "a", max_steps=4, callbacks=[first, ckpt]).fit(TinyClassifier(shuffle=False))
        assert first.last_start is not None  # the step-4 measurement warm-started from the step-3 vector
        (path,) = (tmp_path / "a").glob("*step=4*.ckpt")
        saved = torch.load(path, weights_only=False)["callbacks"][first.state_key]["ritz_vector"]
        assert isinstance(saved, torch.Tensor) and torch.equal(saved, first.ritz_vector)
        resumed = CurvatureMonitor(Classification(), every_n_steps=3, on_checkpoint=False,
                                   **SMALL)  # type: ignore[arg-type]
        assert resumed.ritz_vector is None
        _trainer(tmp_path / "b", max_steps=6, callbacks=[resumed], enable_checkpointing=False).fit(
            TinyClassifier(shuffle=False), ckpt_path=path)
    assert resumed.measured_steps == [3, 4, 6]  # one new measurement after the restore, at step 6
    assert resumed.last_start is not None and torch.equal(resumed.last_start, saved)
    row = resumed.history[-1]
    assert row["num_products"] >= row["trace_probes"] + 1 and row["seconds"] > 0


def test_train_start_warm_up_counts_in_the_overhead_and_leaves_training_alone(tmp_path: Path) -> None:
    pl.seed_everything(3)
    plain = TinyClassifier(shuffle=False)
    _trainer(tmp_path / "off", max_steps=2, enable_checkpointing=False).fit(plain)
    pl.seed_everything(3)
    watched = TinyClassifier(shuffle=False)
    monitor = CurvatureMonitor(Classification(), every_n_epochs=100, on_checkpoint=False,
                               **SMALL)  # type: ignore[arg-type]
    _trainer(tmp_path / "on", max_steps=2, callbacks=[monitor], enable_checkpointing=False).fit(watched)
    assert monitor.history == []  # nothing measured in two steps, yet the warm-up ran at train start
    assert monitor.measure_seconds > 0 and monitor.overhead > 0
    for a, b in zip(plain.parameters(), watched.parameters(), strict=True):
        assert torch.equal(a, b)  # RNG-isolated, no .grad written: training is bit-identical


# ------------------------------------------------------------------------------------ cached linearisation
def _bn_cnn() -> tuple[torch.nn.Module, Any, list]:
    g = torch.Generator().manual_seed(2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Tanh(),
                                    torch.nn.Flatten(), torch.nn.Linear(32, 3)).double()
    bn = model[1]
    bn.running_mean.copy_(torch.tensor([0.3, -0.2]))
    bn.running_var.copy_(torch.tensor([1.5, 0.7]))
    model.train()  # the operators must switch BatchNorm to its running statistics themselves
    x = torch.randn(7, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    return model, Classification(), [(x[:4], y[:4]), (x[4:], y[4:])]


def _lm() -> tuple[torch.nn.Module, Any, list]:
    from lightning_influence.tasks import LanguageModeling
    from tests.helpers.models import tiny_transformer_lm

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (4, 5), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, -2:] = -100
    return tiny_transformer_lm(dtype=torch.float64), LanguageModeling(), [(ids[:2, :-1], labels[:2]),
                                                                          (ids[2:, :-1], labels[2:])]


def _mlp() -> tuple[torch.nn.Module, Any, list]:
    x, y = synthetic_classification(11, seed=1).tensors
    return tiny_mlp(dtype=torch.float64), Classification(), [(x[:6], y[:6]), (x[6:], y[6:])]


@pytest.mark.parametrize(("case", "kind"), [(_mlp, "gnh"), (_bn_cnn, "gnh"), (_lm, "gnh"), (_mlp, "hessian"),
                                            (_bn_cnn, "hessian"), (_lm, "hessian")],
                         ids=["mlp-gnh", "cnn_bn_eval-gnh", "transformer-gnh", "mlp-hessian", "cnn_bn_eval-hessian",
                              "transformer-hessian"])
def test_cached_products_equal_streamed_ones(case: Any, kind: str) -> None:
    model, task, batches = case()
    streamed = make_operator(kind, model, task, batches, linearization="never")
    cached = make_operator(kind, model, task, batches, linearization="always")
    p = streamed.num_params
    g = torch.Generator().manual_seed(5)
    vs = torch.randn(p, 3, generator=g, dtype=torch.float64)
    for op in (streamed, cached):  # one vector (fused path), several (vmap / column loop), quadratic forms
        op.out = (op.matvec(vs[:, 0]), op.matmat(vs), op.quadratic_forms(vs))
    for a, b in zip(streamed.out, cached.out, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(a.abs().max()))
    stats = cached.linearization.stats()
    assert stats["cached_batches"] == 2 and stats["cached_products"] >= 5 and stats["streamed_products"] == 0
    assert stats["traced"] == 2 and stats["channels_last"] == 0  # float64: the layout is kept
    assert streamed.linearization.stats()["cached_products"] == 0
    assert model.training  # modes restored


@pytest.mark.parametrize("kind", ["gnh", "hessian"])
@pytest.mark.parametrize("case", [_mlp, _bn_cnn, _lm], ids=["mlp", "cnn_bn_eval", "transformer"])
def test_stored_tangent_programs_are_reused_at_moved_parameters_and_traced_again_when_stale(case: Any,
                                                                                          kind: str) -> None:
    """A new operator on the same batches reuses the traced tangent programs (no trace) and still equals streaming."""
    model, task, batches = case()
    g = torch.Generator().manual_seed(7)
    vs = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=g, dtype=torch.float64)

    def check(data: list, traced: int) -> None:
        cached = make_operator(kind, model, task, data, linearization="always")
        streamed = make_operator(kind, model, task, data, linearization="never")
        pairs = ((cached.matmat(vs), streamed.matmat(vs)), (cached.quadratic_forms(vs), streamed.quadratic_forms(vs)))
        for a, b in pairs:
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
        assert cached.linearization.stats()["built"] == 2 and cached.linearization.stats()["traced"] == traced

    check(batches, traced=2)
    with torch.no_grad():  # an optimizer step: every parameter moves in place
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    check(batches, traced=0)  # reused: one forward pass per batch instead of a trace
    first = batches[0][0]
    moved = first + 1 if first.is_floating_point() else first.flip(0)  # the same index, other values
    check([(moved, batches[0][1]), batches[1]], traced=1)
    if case is _bn_cnn:  # BatchNorm's running statistics are constants of the trace: updating them retraces
        with torch.no_grad():
            model[1].running_mean.add_(0.5)
        check(batches, traced=2)


def _cnn32(flatten: str) -> tuple[torch.nn.Module, Any, list]:
    """A float32 CNN (a one-channel input, BatchNorm in eval, a pool); ``flatten="view"`` reshapes with ``.view``."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                            torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3), torch.nn.Tanh(),
                                            torch.nn.AdaptiveAvgPool2d(2))
            self.head = torch.nn.Linear(24, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x)  # channels-last activations when the weights are: .view cannot flatten them
            return self.head(h.view(h.shape[0], -1) if flatten == "view" else h.flatten(1))

    g = torch.Generator().manual_seed(4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Net()
    bn = model.body[1]
    bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    bn.running_var.copy_(torch.tensor([1.5, 0.7, 1.0, 2.0]))
    x = torch.randn(10, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    return model, Classification(), [(x[:6], y[:6]), (x[6:], y[6:])]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="channels-last products need oneDNN")
@pytest.mark.parametrize("kind", ["gnh", "hessian"])
@pytest.mark.parametrize("flatten", ["flatten", "view"])
def test_float32_convolutions_run_channels_last_and_equal_the_streamed_products(flatten: str, kind: str) -> None:
    """float32 CNNs linearise with channels-last weights (every convolution then runs channels-last, the one-input-
    channel one included); a forward whose ``.view`` needs NCHW activations falls back to the model's layout."""
    from lightning_influence.operators import linearized

    model, task, batches = _cnn32(flatten)
    cached = make_operator(kind, model, task, batches, linearization="always")
    streamed = make_operator(kind, model, task, batches, linearization="never")
    vs = torch.randn(cached.num_params, 3, generator=torch.Generator().manual_seed(1))
    pairs = [(cached.matmat(vs), streamed.matmat(vs))]
    if kind == "gnh":
        pairs.append((cached.quadratic_forms(vs), streamed.quadratic_forms(vs)))
    for a, b in pairs:  # float32: equal to rounding (the kernels sum in another order)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    stats = cached.linearization.stats()
    assert stats["cached_batches"] == 2 and stats["streamed_products"] == 0
    assert stats["channels_last"] == (2 if flatten == "flatten" else 0)
    programs = [s.program for s in linearized._PROGRAMS[model].values()]
    weights = [st for prog in programs for st, p in zip(prog.strides, cached.params.values(), strict=True)
               if p.dim() == 4]
    expected = [torch.empty_like(p, memory_format=torch.channels_last).stride() if flatten == "flatten"
                else p.stride() for prog in programs for p in cached.params.values() if p.dim() == 4]
    assert weights == expected  # the traced layout, (4, 1, 3, 3)'s channels-last strides included


def test_stored_programs_are_capped_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_influence.operators import linearized

    monkeypatch.setattr(linearized, "MAX_STORED_PROGRAMS", 1)
    model, task, batches = _mlp()
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for _ in range(2):  # batch 1 evicts batch 0's program and the other way round: every build traces
        op = GNHOperator(model, task, batches, linearization="always")
        op.matvec(v)
        assert op.linearization.stats()["traced"] == 2
        assert len(linearized._PROGRAMS[model]) == 1


def test_a_changed_forward_retraces_and_an_untraceable_one_streams() -> None:
    """A stored program that no longer computes the model's outputs is replaced; a model make_fx cannot trace
    (control flow on a tensor's value) streams instead of failing."""

    class Switch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 2).double()
            self.squash, self.data_dependent = True, False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            if self.data_dependent:
                return torch.tanh(h) if float(h.detach().sum()) > 0 else h**2
            return torch.tanh(h) if self.squash else h**2  # a Python flag the trace bakes in

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Switch()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batches = [(x, torch.tensor([0, 1, 1, 0, 1]))]
    v = torch.randn(8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for squash, data_dependent, traced in ((True, False, 1), (False, False, 1), (False, True, 0)):
        model.squash, model.data_dependent = squash, data_dependent
        cached = GNHOperator(model, Classification(), batches, linearization="always")
        expected = GNHOperator(model, Classification(), batches, linearization="never").matvec(v)
        assert torch.allclose(cached.matvec(v), expected, rtol=1e-12, atol=1e-14)
        stats = cached.linearization.stats()
        assert stats["traced"] == traced  # the second point: the stale program was detected and replaced
        assert stats["untraceable"] == int(data_dependent) and stats["streamed_products"] == int(data_dependent)


def test_tiny_budget_streams_and_parameter_updates_discard_the_cache() -> None:
    model, task, batches = _bn_cnn()
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    tiny = GNHOperator(model, task, batches, linearization="always", linearization_budget=1)
    reference = GNHOperator(model, task, batches, linearization="never")
    assert torch.allclose(tiny.matvec(v), reference.matvec(v), rtol=1e-12, atol=1e-14)
    stats = tiny.linearization.stats()
    assert stats["over_budget"] == 2 and stats["cached_batches"] == 0 and stats["streamed_products"] == 2
    cached = GNHOperator(model, task, batches, linearization="always")
    before = cached.matvec(v)
    with torch.no_grad():
        model[4].weight.mul_(1.5)  # an in-place update, as an optimizer step does
    after = cached.matvec(v)
    assert cached.linearization.built == 4  # rebuilt for the new weights
    assert not torch.allclose(before, after)
    assert torch.allclose(after, reference.matvec(v), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------ auto cadence
def test_auto_cadence_holds_its_overhead_budget(tmp_path: Path) -> None:
    budget = 0.25  # a share the short run can reach after the first measurement's one-time warm-up
    monitor = CurvatureMonitor(Classification(), every_n_steps="auto", overhead_budget=budget, on_checkpoint=False,
                               **SMALL)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, max_steps=150, callbacks=[monitor], enable_checkpointing=False).fit(TinyClassifier())
    steps = monitor.measured_steps
    assert len(steps) >= 3 and all(r["trigger"] == "auto" for r in monitor.history)
    # tolerance: 1.5x the budget plus 2 points of slack (the share is measured by the callback itself, so a loaded
    # machine slows training and measurements alike; only a change of load between them moves it)
    assert 0 < monitor.overhead <= 1.5 * budget + 0.02, (monitor.overhead, steps)
    assert all(0 < r["overhead"] < 1 for r in monitor.history)
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert max(gaps) > 1  # it spaces measurements out rather than measuring every step


def test_auto_cadence_argument_errors() -> None:
    from lightning_influence.callbacks import MisconfigurationError

    with pytest.raises(MisconfigurationError, match="overhead_budget must be < 1"):
        CurvatureMonitor(Classification(), every_n_steps="auto", overhead_budget=1.5)
    with pytest.raises(MisconfigurationError, match="every_n_steps"):
        CurvatureMonitor(Classification(), every_n_steps="often")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ mixed precision
class _AutocastMonitor(CurvatureMonitor):
    """Measures from inside a bf16 autocast region, as a hook running under the precision plugin would."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().on_train_batch_end(trainer, *args)


def _float32_fit(root: Path, precision: str, monitor_cls: type[CurvatureMonitor], others: bool = False) -> Any:
    from torch.utils.data import TensorDataset

    from lightning_influence.callbacks.approximate_cv import ApproximateCV
    from lightning_influence.callbacks.influence_report import InfluenceReport
    from lightning_influence.callbacks.pbrf_validation import PBRFValidation

    pl.seed_everything(0)
    module = TinyClassifier(shuffle=False)
    module.net.float()
    module.train_set = TensorDataset(module.train_set.tensors[0].float(), module.train_set.tensors[1])
    module.val_set = TensorDataset(module.val_set.tensors[0].float(), module.val_set.tensors[1])
    task = Classification()
    monitor = monitor_cls(task, every_n_steps=2, on_checkpoint=False, sample_size=16, batch_size=16,
                          trace_probes=4, lanczos_iter=8, lanczos_tol=1e-4)
    callbacks: list[Any] = [monitor]
    if others:  # they do not change training, so the weights at the measured steps are the same without them
        callbacks += [InfluenceReport(task, query_data="val", solver="cg", damping=1e-2, max_train=8, max_queries=2,
                                      progress_bar=False, images=False),
                      ApproximateCV(task, folds=2, damping=1e-2),
                      PBRFValidation(task, num_train=2, num_queries=2, max_iter=10)]
    trainer = _trainer(root, max_steps=4, precision=precision, callbacks=callbacks, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return monitor, trainer


@pytest.mark.timeout(200)
def test_bf16_mixed_with_all_four_callbacks_matches_float32_curvature(tmp_path: Path) -> None:
    bf16, trainer = _float32_fit(tmp_path / "bf16", "bf16-mixed", _AutocastMonitor, others=True)
    fp32, _ = _float32_fit(tmp_path / "fp32", "32-true", CurvatureMonitor)
    assert bf16.measured_steps == fp32.measured_steps == [2, 4]
    for a, b in zip(bf16.history, fp32.history, strict=True):
        for key in ("trace", "lambda_max"):
            assert abs(a[key] - b[key]) <= 0.01 * abs(b[key]), key
    assert {"influence/num_train", "cv/approx_loss", "pbrf/converged_fraction"} <= set(trainer.callback_metrics)
    # autocast is off inside the measurement: a measurement from within a bf16 autocast region is float32 exact
    plain, _ = _float32_fit(tmp_path / "plain", "bf16-mixed", CurvatureMonitor)
    for a, b in zip(bf16.history, plain.history, strict=True):
        assert a["trace"] == pytest.approx(b["trace"], rel=1e-6)
        assert a["lambda_max"] == pytest.approx(b["lambda_max"], rel=1e-6)


@pytest.mark.timeout(200)
def test_16_mixed_training_gives_float32_curvature_within_one_percent(tmp_path: Path) -> None:
    # float16 autocast (with Lightning's grad scaler) changes the weights' trajectory slightly; the measurement itself
    # runs with autocast off, in the float32 weights' dtype
    half, trainer = _float32_fit(tmp_path / "fp16", "16-mixed", CurvatureMonitor)
    fp32, _ = _float32_fit(tmp_path / "fp32", "32-true", CurvatureMonitor)
    assert type(trainer.precision_plugin).__name__ == "MixedPrecision"
    assert half.measured_steps == fp32.measured_steps == [2, 4]
    for a, b in zip(half.history, fp32.history, strict=True):
        for key in ("trace", "lambda_max"):
            assert abs(a[key] - b[key]) <= 0.01 * abs(b[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lanczos_keeps_semi_orthogonality_and_the_ritz_value_exact(dtype: torch.dtype) -> None:
    """The second Gram-Schmidt pass runs only when needed, yet the basis stays semi-orthogonal (|q_i.q_j| ~ sqrt(eps))
    and lambda_max as accurate as working precision allows, on a spectrum with a near-double top run to convergence."""
    from lightning_influence.spectrum import DenseOperator

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    evals = 100.0 * 0.9 ** torch.arange(400, dtype=torch.float64)
    evals[1] = 99.0
    a = ((q * evals) @ q.T).to(dtype)
    est = lanczos_lambda_max(DenseOperator(a), 60, tol=1e-9, seed=3)
    basis = est.basis.to(torch.float64)
    eps = torch.finfo(dtype).eps
    off = float((basis @ basis.T - torch.eye(basis.shape[0], dtype=torch.float64)).abs().max())
    assert est.num_products > 15  # ran well past the point where plain Lanczos loses orthogonality
    assert off <= 10 * eps**0.5, off
    assert abs(est.value - 100.0) <= 100.0 * (1e-6 if dtype == torch.float32 else 1e-12), est.value


def test_estimate_spectrum_builds_the_cache_at_its_first_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """``"auto"`` waits for a second pass (an operator used once never pays a build) unless the caller expects
    reuse, as ``estimate_spectrum`` does: then no product streams, and the estimates equal the streamed ones."""
    from lightning_influence.operators import linearized
    from lightning_influence.spectrum import estimate_spectrum

    monkeypatch.setattr(linearized, "AUTO_MIN_BYTES", 0)  # the tiny model counts as large enough to cache
    model, task, batches = _mlp()
    once = GNHOperator(model, task, batches, linearization="auto")
    once.matvec(torch.ones(once.num_params, dtype=torch.float64))
    assert once.linearization.stats()["streamed_products"] == 2 and once.linearization.stats()["built"] == 0
    summaries = []
    for mode in ("auto", "never"):
        op = GNHOperator(model, task, batches, linearization=mode)
        summaries.append(estimate_spectrum(op, damping=0.1, trace_probes=4, lanczos_iter=6, seed=0))
        stats = op.linearization.stats()
        if mode == "auto":  # every pass cached, the first included
            assert stats["streamed_products"] == 0 and stats["built"] == 2 and stats["cached_products"] > 4
    assert summaries[0].lambda_max == pytest.approx(summaries[1].lambda_max, rel=1e-10)
    assert summaries[0].trace == pytest.approx(summaries[1].trace, rel=1e-10)


class _ConvClassifier(pl.LightningModule):
    """A float32 CNN on seeded 6x6 images (a one-channel input, ReLU, max pool), trained by plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                           torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                           torch.nn.Linear(54, 3))
        self.train_set = torch.utils.data.TensorDataset(torch.randn(40, 1, 6, 6, generator=g),
                                                        torch.randint(0, 3, (40,), generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train_set, batch_size=10, shuffle=False)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="channels-last products need oneDNN")
def test_monitor_on_a_float32_cnn_measures_the_dense_gnh_through_channels_last_programs(tmp_path: Path) -> None:
    """End to end: the monitor's cached, channels-last, rewritten, straight-line products give the λ_max of the
    float64 dense GNH of its sample at the final weights (to its Lanczos tolerance and float32 rounding)."""
    import copy

    from lightning_influence.config import SpectrumConfig
    from lightning_influence.operators import linearized

    model = _ConvClassifier()
    config = SpectrumConfig(trace_probes=4, lanczos_iter=40, lanczos_tol=1e-4, lanczos_start="gradient",
                            linearization="always")
    monitor = CurvatureMonitor(Classification(), every_n_steps=8, sample_size=40, batch_size=20, config=config,
                               on_checkpoint=False)
    _trainer(tmp_path, max_steps=8, callbacks=[monitor]).fit(model)
    assert monitor.measured_steps == [8]
    exact_model = copy.deepcopy(model.net).double()
    batches = [(x.double(), y) for x, y in monitor._source.prepared(torch.device("cpu"))]  # the monitor's sample
    dense = GNHOperator(exact_model, Classification(), batches).dense()
    exact = float(torch.linalg.eigvalsh(dense)[-1])
    row = monitor.history[-1]
    assert exact * (1 - 1e-3) <= row["lambda_max"] <= exact * (1 + 1e-4)
    assert abs(row["trace"] - float(dense.trace())) <= 4 * row["trace_stderr"] + 1e-4 * float(dense.trace())
    programs = [s.program for s in linearized._PROGRAMS[model].values()]  # kept per LightningModule
    conv_weights = [p for p in model.net.parameters() if p.dim() == 4]
    assert programs and all(  # traced with channels-last weights, the one-input-channel one included
        st == torch.empty_like(w, memory_format=torch.channels_last).stride()
        for prog in programs for st, w in zip([s for s in prog.strides if len(s) == 4], conv_weights, strict=True))
