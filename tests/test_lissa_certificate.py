"""LiSSA's certificate means what it says: ``converged`` exactly when the scores are within Pearson 0.99 of exact.

The certificate is the agreement of two LiSSA chains with disjoint batch streams and antithetic starts (their
Spearman-Brown reliability along per-example gradients of pool examples); the ground truth is the exact damped-GNH
influence of the same model. Both directions are exercised: the default step rule (converged on every seed) and a
run cut to half the paper's number of steps (converged on some seeds only).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_influence.config import DEFAULT_LISSA_STEPS_FACTOR
from lightning_influence.exceptions import DivergenceError
from lightning_influence.influence import influence_scores
from lightning_influence.tasks import Classification
from tests.test_influence import digits_model

SEEDS = range(5)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.fixture(scope="module")
def problem() -> dict[str, Any]:
    model, x, y, xq, yq = digits_model()
    common = {"train_indices": range(100), "damping": 1e-3, "self_influence": False}
    exact = influence_scores(model, Classification(), (x, y), (xq, yq), solver="exact", **common)
    return {"model": model, "train": (x, y), "query": (xq, yq), "common": common, "exact": exact.scores}


def _runs(problem: dict[str, Any], **overrides: Any) -> list[tuple[float, bool, dict[str, Any]]]:
    out = []
    for seed in SEEDS:
        res = influence_scores(problem["model"], Classification(), problem["train"], problem["query"], solver="lissa",
                               seed=seed, **problem["common"], **overrides)
        out.append((_pearson(res.scores, problem["exact"]), bool(res.solve["converged"]), res.solve))
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)  # five seeds of the default (2 chains x 6/(lambda eta) steps): ~40 s idle, ~110 s loaded
def test_default_lissa_converges_and_says_so_on_every_seed(problem: dict[str, Any]) -> None:
    runs = _runs(problem)
    for rho, converged, solve in runs:
        cert = solve["info"]["certificate"]
        assert solve["info"]["chains"] == 2 and cert["probes"] > 0
        assert converged == (rho >= 0.99), (rho, cert)
        assert rho >= 0.99, [r for r, _, _ in runs]  # the default step rule reaches the threshold
        assert abs(cert["reliability"] - rho) < 0.01, (cert["reliability"], rho)  # calibrated, not just above it
        # the residual is on the whole pool (400 examples <= certificate_size) and is labelled so
        assert cert["sample"].startswith("whole pool")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_lissa_is_flagged_exactly_when_its_scores_are_off(problem: dict[str, Any]) -> None:
    runs = _runs(problem, lissa_steps_factor=1.0)  # half of paper 1's T = 2/(lambda eta)
    rhos = [r for r, _, _ in runs]
    assert min(rhos) < 0.99, rhos  # the short runs are not all good: the certificate has something to catch
    for rho, converged, solve in runs:
        assert converged == (rho >= 0.99), (rho, solve["info"]["certificate"])
    assert DEFAULT_LISSA_STEPS_FACTOR > 1.0


def test_divergence_message_names_the_constant_in_use(problem: dict[str, Any]) -> None:
    with pytest.raises(DivergenceError) as err:
        influence_scores(problem["model"], Classification(), problem["train"], problem["query"], solver="lissa",
                         damping=1e-3, lissa_batch_size=1, lissa_eta=50.0, lissa_steps=200, lissa_constant=3.5,
                         self_influence=False, train_indices=range(5))
    text = str(err.value)
    assert "larger C than 3.5" in text, text  # the constant actually in use, not the paper's 2
    assert "C=2" not in text, text
