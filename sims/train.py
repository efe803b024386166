"""``fedchain train``: federated training of many devices with the learning
library alone (no network), reporting test accuracy and (eps, delta) per
round.

Defaults are the paper's setting (40 devices: 15 phones on tier 0, 25
computers on tier 2; MNIST split IID) with DP-SGD calibrated so that every
device spends at most ``--epsilon`` at ``--delta`` over ALL its steps,
accounted with PLD. ``--no-dp`` trains without privacy. ``--model scatter``
replaces the CNN tiers by one linear model on fixed scattering features
(every device on it), the setting that reaches the paper's DP accuracy.
See the module docs of ``fedchain.learning`` for what each knob does.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

from .arguments import int_at_least, positive_ints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="folder with the MNIST IDX files (else FEDCHAIN_DATA...)")
    parser.add_argument("--devices", type=int_at_least(1), default=40)
    parser.add_argument(
        "--examples",
        type=int_at_least(1),
        default=None,
        help="train on this many training images (a seeded draw; default all); the test set "
        "stays whole, so accuracies stay comparable",
    )
    parser.add_argument(
        "--phones", type=int_at_least(0), default=15, help="devices on tier 0; rest tier 2"
    )
    parser.add_argument("--rounds", type=int_at_least(1), default=10)
    parser.add_argument("--local-steps", type=int_at_least(1), default=50)
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=64, help="expected batch per step"
    )
    parser.add_argument("--lr", type=float, default=None, help="default: 2/clip (DP), 0.1 (no DP)")
    parser.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="cosine: round r (from 0) uses lr * (1 + cos(pi r / rounds)) / 2",
    )
    parser.add_argument(
        "--sampling",
        choices=["poisson", "fixed"],
        default="poisson",
        help="poisson: the accounted DP draw (computes B + 3 sqrt(B) rows); fixed: exactly B",
    )
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument(
        "--server-lr", type=float, default=1.0, help="scale of the aggregated delta (1: eq. 7)"
    )
    parser.add_argument("--clip", type=float, default=1.0, help="per-example L2 clip S")
    parser.add_argument("--epsilon", type=float, default=3.0, help="per-device budget, all steps")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--noise", type=float, default=None, help="fix the noise multiplier")
    parser.add_argument(
        "--budget",
        choices=["uniform", "loss-adaptive"],
        default="uniform",
        help="uniform: one noise multiplier for all steps, calibrated to --epsilon for the "
        "smallest device; loss-adaptive: the paper's policy (LossAdaptiveBudget: eps by local "
        "data size from --epsilon at 1,500 examples, spending brought forward when a device's "
        "loss stalls; a device out of budget sits out)",
    )
    parser.add_argument("--no-dp", action="store_true", help="train without privacy")
    parser.add_argument("--density", type=float, default=1.0, help="top-k density of updates")
    parser.add_argument("--partition", choices=["iid", "dirichlet", "shards"], default="iid")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument(
        "--aggregator", choices=["mean", "median", "trimmed", "krum"], default="mean"
    )
    parser.add_argument(
        "--model",
        choices=["cnn", "scatter"],
        default="cnn",
        help="cnn: the tiered CNNs (--widths, --phones on tier 0); scatter: a linear model on "
        "fixed scattering features, one tier (learning/README.md, 'Scattering')",
    )
    parser.add_argument(
        "--widths", default="8,16,32", type=positive_ints(3), help="conv1,conv2,hidden"
    )
    parser.add_argument("--activation", choices=["tanh", "relu"], default="tanh")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--seed", type=int_at_least(0), default=0)


def run(args: argparse.Namespace) -> int:
    from fedchain.learning.errors import ConfigError

    try:
        return _run(args)
    except ConfigError as exc:  # a setting out of range: say which, no traceback
        raise SystemExit(f"fedchain train: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    import logging

    import jax
    import numpy as np

    from fedchain.learning import (
        CnnSpec,
        CoordinateMedian,
        Device,
        Federation,
        Krum,
        LinearSpec,
        LocalConfig,
        LossAdaptiveBudget,
        PrivacyAccountant,
        TrimmedMean,
        WeightedMean,
        calibrate_noise_multiplier,
        load_mnist,
        partition,
        scatter_images,
    )
    from fedchain.sims.report import emit_json, print_table

    # dp-accounting's RDP guess logs a warning per order it drops; not news here
    logging.getLogger("absl").setLevel(logging.ERROR)
    # Settings first (a ConfigError names the bad one at once), data after:
    # loading it and computing scattering features take seconds to minutes.
    private = not args.no_dp
    config = LocalConfig(
        steps=args.local_steps,
        batch_size=args.batch_size,
        sampling=args.sampling,
        clip_norm=args.clip if private else None,
        momentum=args.momentum,
        optimizer=args.optimizer,
        density=args.density,
    )
    if private and args.budget == "loss-adaptive" and args.noise is not None:
        raise SystemExit("fedchain train: --noise and --budget loss-adaptive exclude each other")
    data = load_mnist(args.data)
    if data.is_subset:
        print(data.notes[0])
    if args.examples is not None:
        if not 0 < args.examples <= len(data.train_labels):
            raise SystemExit(f"fedchain train: --examples must be 1..{len(data.train_labels)}")
        draw = np.random.default_rng([args.seed, 1]).permutation(len(data.train_labels))
        keep = np.sort(draw[: args.examples])
        data = dataclasses.replace(
            data, train_images=data.train_images[keep], train_labels=data.train_labels[keep]
        )
    if args.model == "scatter":
        started = time.perf_counter()
        data = dataclasses.replace(
            data,
            train_images=scatter_images(data.train_images),
            test_images=scatter_images(data.test_images),
        )
        print(f"scattering features in {time.perf_counter() - started:.0f}s", flush=True)
        base = LinearSpec()
    else:
        c1, c2, hidden = args.widths
        base = CnnSpec(c1, c2, hidden, dropout=args.dropout, activation=args.activation)
    rng = np.random.default_rng(args.seed)
    n = len(data.train_labels)
    if args.partition == "iid":
        parts = partition.iid(n, args.devices, rng)
    elif args.partition == "dirichlet":
        parts = partition.dirichlet(data.train_labels, args.devices, args.alpha, rng, min_size=64)
    else:
        parts = partition.shards(data.train_labels, args.devices, 2, rng)
    phones = args.devices if args.model == "scatter" else args.phones  # one tier
    devices = [Device(f"dev{i:03d}", 0 if i < phones else 2, p) for i, p in enumerate(parts)]
    aggregator = {
        "mean": WeightedMean(),
        "median": CoordinateMedian(),
        "trimmed": TrimmedMean(0.1),
        "krum": Krum(byzantine=max(1, args.devices // 10), select=args.devices // 2),
    }[args.aggregator]
    lr = args.lr if args.lr is not None else (2.0 / args.clip if private else 0.1)
    # PLD accounts Poisson sampling (with its truncation) exactly; fixed-size
    # sampling without replacement has only the RDP (replace-one) analysis
    method = "pld" if args.sampling == "poisson" else "rdp"
    accountant = PrivacyAccountant(args.delta, method)
    noise = 0.0
    policy = None
    if private and args.budget == "loss-adaptive":
        policy = LossAdaptiveBudget(base_epsilon=args.epsilon, delta=args.delta, method=method)
    elif private:
        smallest = min(len(d.indices) for d in devices)
        if args.noise is not None:
            noise = args.noise
        else:
            noise = calibrate_noise_multiplier(
                args.epsilon,
                args.delta,
                args.rounds * args.local_steps,
                args.batch_size / smallest,
                method=method,
                dataset_size=smallest,
                sampling=args.sampling,
                capacity=config.physical_batch if args.sampling == "poisson" else None,
            )
        print(f"noise multiplier z = {noise:.4f} (clip S = {args.clip}, lr = {lr})", flush=True)
    fed = Federation(data, devices, config, base=base, aggregator=aggregator)
    state = fed.init(jax.random.key(args.seed))
    rows, history = [], []
    losses: dict[str, list[float]] = {d.id: [] for d in devices}
    planner = None if policy is None else _NoisePlanner(policy, accountant, config, args)
    start = time.perf_counter()
    for r in range(args.rounds):
        round_lr = lr
        if args.lr_schedule == "cosine":
            round_lr = lr * (1.0 + math.cos(math.pi * r / args.rounds)) / 2.0
        if planner is None:
            plan, sitting_out = noise, set()
        else:
            plan, sitting_out = planner.plan(devices, r, losses)
            if len(sitting_out) == len(devices):
                print(f"round {r + 1}: every device has spent its budget; stopping", flush=True)
                break
        state, report = fed.round(
            state,
            jax.random.key(args.seed * 1000 + r + 1),
            learning_rate=round_lr,
            noise_multipliers=plan,
            accountant=accountant if private and planner is None else None,
            server_learning_rate=args.server_lr,
            transform=_leaving_out(sitting_out) if sitting_out else None,
        )
        if planner is not None:
            planner.record(devices, plan, sitting_out)
        for device, value in report.losses.items():
            if device not in sitting_out:
                losses[device].append(value)
        acc = fed.accuracy(state.params)
        several = len(fed.tiers) > 1 and 0 in fed.tiers
        acc_phone = fed.accuracy(state.params, tier=0) if several else acc
        eps = max((s.epsilon for s in accountant.report().values()), default=0.0)
        loss = float(np.mean([v for d, v in report.losses.items() if d not in sitting_out]))
        elapsed = time.perf_counter() - start
        rows.append([r + 1, acc, acc_phone, loss, eps if private else "no DP", elapsed])
        dropped = dict(report.result.dropped)
        history.append({"round": r + 1, "accuracy": acc, "accuracy_tier0": acc_phone,
                        "loss": loss, "epsilon": eps, "lr": round_lr, "seconds": round(elapsed, 2),
                        "dropped": dropped})  # fmt: skip
        print(
            f"round {r + 1}: accuracy {acc:.4f} (phones {acc_phone:.4f}) loss {loss:.4f} "
            f"eps {eps:.3f} lr {round_lr:.4g} [{elapsed:.0f}s]",
            flush=True,
        )
        if dropped:  # a weaker round than planned: say so loudly
            print(f"round {r + 1}: {len(dropped)} updates left out: {dropped}", flush=True)
        if sitting_out:
            print(f"round {r + 1}: {len(sitting_out)} devices out of budget sat out", flush=True)
    print_table(
        "federated training" + (" [MNIST SUBSET]" if data.is_subset else ""),
        ["round", "accuracy", "phones' accuracy", "loss", "max eps", "seconds"],
        rows,
    )
    emit_json(
        "train",
        {
            "devices": args.devices,
            "examples": len(data.train_labels),
            "phones": phones,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "sampling": args.sampling,
            "learning_rate": lr,
            "lr_schedule": args.lr_schedule,
            "momentum": args.momentum,
            "optimizer": args.optimizer,
            "server_lr": args.server_lr,
            "dropout": args.dropout,
            "seed": args.seed,
            "dp": private,
            "clip": args.clip if private else None,
            "budget": args.budget if private else None,
            "noise_multiplier": noise if policy is None else None,
            "epsilon_per_device": {d: round(s.epsilon, 4) for d, s in accountant.report().items()},
            "delta": args.delta,
            "epsilon": history[-1]["epsilon"] if history else 0.0,
            "density": args.density,
            "partition": args.partition,
            "aggregator": args.aggregator,
            "model": args.model,
            "widths": args.widths if args.model == "cnn" else None,
            "activation": args.activation if args.model == "cnn" else None,
            "data": "subset" if data.is_subset else "mnist",
            "final_accuracy": history[-1]["accuracy"] if history else None,
            "history": history,
        },
    )
    return 0


def _leaving_out(devices: set[str]):
    """A round transform that drops these devices' updates before aggregation."""

    def transform(updates):
        return [u for u in updates if u.device not in devices]

    return transform


class _NoisePlanner:
    """Each round's noise multiplier per device under a
    :class:`~fedchain.learning.LossAdaptiveBudget`, and its accounting.

    Devices with the same data size, loss history verdict and past events
    get the same answer, so calibrations (a PLD search each) are cached on
    exactly those inputs: with an IID split that is one per round. A device
    whose budget is spent sits the round out; its update is never released,
    so the round costs it nothing and nothing is recorded. Sitting out is
    for good (``retired``): the error-feedback residual such a round leaves
    comes from noise nobody accounted and must never reach a released
    update."""

    def __init__(self, policy, accountant, config, args) -> None:
        self.policy = policy
        self.accountant = accountant
        self.config = config
        self.args = args
        self._cache: dict[tuple, float | None] = {}
        self.retired: set[str] = set()

    def plan(self, devices, round_index: int, losses) -> tuple[dict[str, float], set[str]]:
        """Each device's noise multiplier this round, and who sits out."""
        plan: dict[str, float] = {}
        out: set[str] = set()
        for device in devices:
            z = None if device.id in self.retired else self._noise(device, round_index, losses)
            if z is None:
                self.retired.add(device.id)
                out.add(device.id)
                plan[device.id] = 1.0  # computed, never released
            else:
                plan[device.id] = z
        return plan, out

    def _noise(self, device, round_index: int, losses) -> float | None:
        """The calibrated multiplier, or None when nothing may be spent."""
        from fedchain.learning import BudgetExhaustedError, PrivacyAccountingError

        args, config = self.args, self.config
        size = len(device.indices)
        history = losses[device.id]
        target = self.policy.target_epsilon(size, round_index, args.rounds, history)
        key = (size, target, self.accountant.events(device.id))
        if key not in self._cache:
            try:
                self._cache[key] = self.policy.noise_for_round(
                    self.accountant,
                    device.id,
                    dataset_size=size,
                    batch_size=min(args.batch_size, size),
                    steps=args.local_steps,
                    round_index=round_index,
                    rounds=args.rounds,
                    losses=history,
                    sampling=args.sampling,
                    capacity=config.physical_batch if args.sampling == "poisson" else None,
                )
            except BudgetExhaustedError:
                self._cache[key] = None
            except PrivacyAccountingError as exc:
                # No noise meets this round's target: releasing anyway
                # would be unaccounted, so the device retires.
                print(f"{device.id}: {exc}; it sits out for good", flush=True)
                self._cache[key] = None
        return self._cache[key]

    def record(self, devices, plan: dict[str, float], sitting_out: set[str]) -> None:
        for device in devices:
            if device.id not in sitting_out:
                steps = self.config.dp_steps(plan[device.id], len(device.indices))
                self.accountant.record(device.id, steps)
