"""``fedchain train`` end to end at a tiny scale, on real MNIST (the shipped
subset, or the full files where ``FEDCHAIN_DATA`` points): it learns, and
under the paper's loss-adaptive budget every device spends what its data
size earns and no more, as the accountant reports it."""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from fedchain.learning import LossAdaptiveBudget, load_mnist
from fedchain.learning.errors import DataWarning
from fedchain.sims import cli

TINY = ["--devices", "4", "--phones", "4", "--batch-size", "16", "--seed", "3"]


def _train(capsys, *argv: str) -> dict:
    logging.getLogger("absl").setLevel(logging.ERROR)
    assert cli.main(["train", *TINY, *argv]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def test_training_without_privacy_learns(capsys) -> None:
    out = _train(capsys, "--no-dp", "--rounds", "2", "--local-steps", "15", "--lr", "0.1")
    accuracies = [h["accuracy"] for h in out["history"]]
    assert out["dp"] is False and out["epsilon_per_device"] == {}
    assert accuracies[-1] > 0.4, accuracies  # chance is 0.1


def test_the_scattering_model_learns_under_dp_on_a_draw_of_the_data(capsys) -> None:
    """``--model scatter``: one tier (every device trains the linear model on
    scattering features), DP accounted, and ``--examples`` trains on a
    seeded draw of the training images while testing on all of them."""
    out = _train(
        capsys, "--model", "scatter", "--examples", "800", "--rounds", "2",
        "--local-steps", "4", "--batch-size", "32", "--lr", "1",
    )  # fmt: skip
    assert out["model"] == "scatter" and out["widths"] is None
    assert out["examples"] == 800 and out["phones"] == 4
    assert 0 < out["epsilon"] <= 3.0 * 1.001 and len(out["epsilon_per_device"]) == 4
    accuracies = [h["accuracy"] for h in out["history"]]
    assert accuracies[-1] > 0.5, accuracies  # chance is 0.1
    assert all(h["accuracy_tier0"] == h["accuracy"] for h in out["history"])


def test_examples_out_of_range_are_refused(capsys) -> None:
    with pytest.raises(SystemExit, match=r"--examples must be 1\.\."):
        cli.main(["train", *TINY, "--examples", str(10**9)])
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check
        cli.main(["train", *TINY, "--examples", "0"])
    assert exit_info.value.code == 2 and "--examples" in capsys.readouterr().err


def test_the_loss_adaptive_budget_spends_each_devices_budget_and_no_more(capsys) -> None:
    out = _train(
        capsys, "--budget", "loss-adaptive", "--sampling", "fixed", "--rounds", "2",
        "--local-steps", "3", "--epsilon", "2",
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        n = len(load_mnist(download=False).train_labels)
    budget = LossAdaptiveBudget(base_epsilon=2.0).total_epsilon(n // 4)
    spent = out["epsilon_per_device"]
    assert sorted(spent) == ["dev000", "dev001", "dev002", "dev003"]
    for eps in spent.values():
        assert 0.9 * budget <= eps <= budget * 1.001, (eps, budget)  # z found to 5e-3
    first, last = (h["epsilon"] for h in out["history"])
    assert 0 < first < last  # the schedule spends part of it in round 1
    assert out["budget"] == "loss-adaptive" and out["noise_multiplier"] is None


def test_a_fixed_noise_and_the_adaptive_budget_are_refused_together() -> None:
    with pytest.raises(SystemExit, match="exclude each other"):
        cli.main(["train", *TINY, "--budget", "loss-adaptive", "--noise", "1.0"])


def test_a_device_out_of_budget_sits_out_for_good() -> None:
    """Once refused, a device never trains for release again: its round's
    error-feedback residual comes from noise nobody accounted."""
    import argparse

    import numpy as np

    from fedchain.learning import Device, LocalConfig, PrivacyAccountant
    from fedchain.learning.accountant import DpSgdSteps
    from fedchain.sims.train import _NoisePlanner

    args = argparse.Namespace(rounds=4, batch_size=16, local_steps=2, sampling="fixed")
    config = LocalConfig(steps=2, batch_size=16, sampling="fixed", clip_norm=1.0)
    accountant = PrivacyAccountant(1e-5, "rdp")
    policy = LossAdaptiveBudget(base_epsilon=1.0, method="rdp")
    spent, fresh = Device("spent", 0, np.arange(1500)), Device("fresh", 0, np.arange(1500))
    accountant.record("spent", DpSgdSteps(0.5, 50, 1500, 16, "fixed"))  # far past eps 1
    planner = _NoisePlanner(policy, accountant, config, args)
    plan, out = planner.plan([spent, fresh], 0, {"spent": [], "fresh": []})
    assert out == {"spent"} and plan["fresh"] > 0
    planner.record([spent, fresh], plan, out)
    assert len(accountant.events("spent")) == 1  # nothing recorded for it
    assert len(accountant.events("fresh")) == 1
    plan, out = planner.plan([spent], 3, {"spent": []})  # asked again: still out
    assert out == {"spent"}
