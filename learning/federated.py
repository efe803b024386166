"""Federated rounds of many devices with the learning library alone.

This is the learning half of the serverless round (DESIGN.md), without a
network: every device trains locally from the global model (all devices of
a tier in one jitted call, :mod:`fedchain.learning.local`), privatizes and
sparsifies its update, and the ordered list of updates is aggregated in
NumPy into the next global model. The simulator (``sims``) runs the same
pieces with gossip and consensus in between; ``fedchain train`` runs them
back to back.

State is explicit: :meth:`Federation.init` returns a
:class:`FederationState` (global parameters, each tier's top-k residuals,
the round number) and :meth:`Federation.round` returns the next one. The
privacy accountant is the one object that accumulates, because it is the
record of what was spent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedchain.learning.accountant import PrivacyAccountant
from fedchain.learning.aggregation import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    WeightedMean,
    apply_delta,
)
from fedchain.learning.data import Dataset
from fedchain.learning.errors import AggregationError, ConfigError
from fedchain.learning.local import (
    DeviceData,
    LocalConfig,
    evaluation_set,
    make_evaluator,
    make_local_round,
    pad_devices,
    zero_residual,
)
from fedchain.learning.models import ModelSpec, init_params, param_shapes, tier_spec

__all__ = ["Device", "Federation", "FederationState", "RoundReport"]


@dataclass(frozen=True)
class Device:
    """A device: its identifier, model tier and the indices of its local
    training examples."""

    id: str
    tier: int
    indices: np.ndarray = field(repr=False)


class FederationState(NamedTuple):
    """Everything that changes between rounds."""

    params: dict[str, np.ndarray]
    residuals: dict[int, dict[str, jax.Array]]
    round: int


@dataclass(frozen=True)
class RoundReport:
    """What one round did: the aggregation result, each device's mean local
    loss, and how many local steps hit the Poisson capacity."""

    result: AggregateResult
    losses: dict[str, float]
    truncated_steps: int


class Federation:
    """Devices, their data and their compiled local rounds, fixed at build.

    The deepest tier present defines the global model; a device of tier t
    trains the tensors of tier t (a subset, see :mod:`models`).
    """

    def __init__(
        self,
        dataset: Dataset,
        devices: Sequence[Device],
        config: LocalConfig,
        *,
        base: ModelSpec | None = None,
        aggregator: Aggregator | None = None,
    ):
        if not devices:
            raise ConfigError("a federation needs devices")
        ids = [d.id for d in devices]
        if len(set(ids)) != len(ids):
            raise ConfigError("device ids must be unique")
        self.dataset = dataset
        self.devices = tuple(devices)
        self.config = config
        self.aggregator = aggregator or WeightedMean()
        self.tiers = sorted({d.tier for d in devices})
        self.specs = {t: tier_spec(t, base) for t in self.tiers}
        self.global_spec = self.specs[self.tiers[-1]]
        self._members = {t: [d for d in devices if d.tier == t] for t in self.tiers}
        self._data: dict[int, DeviceData] = {
            t: pad_devices(dataset.train_images, dataset.train_labels, [d.indices for d in m])
            for t, m in self._members.items()
        }
        self._rounds = {t: make_local_round(self.specs[t], config) for t in self.tiers}
        self._evaluate = {t: make_evaluator(self.specs[t]) for t in self.tiers}
        self._test: tuple[jax.Array, jax.Array] | None = None

    def members(self, tier: int) -> list[Device]:
        return list(self._members[tier])

    def init(self, key: jax.Array) -> FederationState:
        """Fresh global parameters and zero residuals."""
        params = {k: np.asarray(v) for k, v in init_params(key, self.global_spec).items()}
        residuals = {t: zero_residual(self.specs[t], len(m)) for t, m in self._members.items()}
        return FederationState(params, residuals, 0)

    def tier_params(self, params: Mapping[str, np.ndarray], tier: int) -> dict[str, jax.Array]:
        return {name: jnp.asarray(params[name]) for name in param_shapes(self.specs[tier])}

    def local_updates(
        self,
        state: FederationState,
        key: jax.Array,
        *,
        learning_rate: float,
        noise_multipliers: Mapping[str, float] | float = 0.0,
        accountant: PrivacyAccountant | None = None,
    ) -> tuple[list[ClientUpdate], dict[int, dict[str, jax.Array]], dict[str, float], int]:
        """Every device's update for this round, in device order, with the new
        residuals, the losses and the truncated-step count. Records each
        device's DP-SGD steps in ``accountant`` when given."""
        updates: dict[str, ClientUpdate] = {}
        losses: dict[str, float] = {}
        residuals = {}
        truncated = 0
        tier_keys = jax.random.split(key, len(self.tiers))
        for tier, tier_key in zip(self.tiers, tier_keys, strict=True):
            members = self._members[tier]
            z = np.array(
                [
                    noise_multipliers
                    if isinstance(noise_multipliers, int | float)
                    else noise_multipliers[d.id]
                    for d in members
                ],
                np.float32,
            )
            out = self._rounds[tier](
                self.tier_params(state.params, tier),
                self._data[tier],
                jax.random.split(tier_key, len(members)),
                jnp.asarray(z),
                learning_rate,
                state.residuals[tier],
            )
            host = jax.device_get(out.updates)
            loss = np.asarray(out.loss)
            truncated += int(np.sum(np.asarray(out.truncated)))
            residuals[tier] = out.residual
            for i, device in enumerate(members):
                delta = {name: np.asarray(v[i], np.float32) for name, v in host.items()}
                updates[device.id] = ClientUpdate(device.id, len(device.indices), delta)
                losses[device.id] = float(loss[i])
                if accountant is not None and self.config.private:
                    accountant.record(
                        device.id, self.config.dp_steps(float(z[i]), len(device.indices))
                    )
        ordered = [updates[d.id] for d in self.devices]
        return ordered, residuals, losses, truncated

    def round(
        self,
        state: FederationState,
        key: jax.Array,
        *,
        learning_rate: float,
        noise_multipliers: Mapping[str, float] | float = 0.0,
        accountant: PrivacyAccountant | None = None,
        transform=None,
        server_learning_rate: float = 1.0,
    ) -> tuple[FederationState, RoundReport]:
        """One round: local updates, then aggregation in device order.
        ``transform(updates) -> updates`` (optional) sees the list before
        aggregation (a scenario's malicious devices act there).

        ``server_learning_rate`` scales the aggregated delta before it is
        applied (FedOpt's server step; 1 is eq. 7). Averaging cancels much of
        what the devices' trajectories do not share, so the mean delta is a
        cleaner direction than any one device's and can be stepped further.
        It is post-processing of the aggregate: no privacy cost."""
        if not server_learning_rate > 0:
            raise ConfigError(f"server learning rate must be positive, got {server_learning_rate}")
        updates, residuals, losses, truncated = self.local_updates(
            state,
            key,
            learning_rate=learning_rate,
            noise_multipliers=noise_multipliers,
            accountant=accountant,
        )
        if transform is not None:
            updates = list(transform(updates))
        result = self._aggregate_finite(updates)
        delta = result.delta
        if server_learning_rate != 1.0:
            scale = np.float32(server_learning_rate)
            delta = {name: np.asarray(v, np.float32) * scale for name, v in delta.items()}
        params = apply_delta(state.params, delta)
        return FederationState(params, residuals, state.round + 1), RoundReport(
            result, losses, truncated
        )

    def _aggregate_finite(self, updates: list[ClientUpdate]) -> AggregateResult:
        """Aggregate, leaving out devices whose update is not finite.

        A device that diverged (or lies) must not stop the round for everyone:
        it is dropped with its reason, as a norm bound drops an implausible
        update, and the round goes on with the rest. The aggregators
        themselves stay strict and refuse non-finite input outright.
        """
        finite = [u for u in updates if all(np.all(np.isfinite(v)) for v in u.delta.values())]
        if not finite:
            raise AggregationError("every device's update is non-finite")
        result = self.aggregator.aggregate(finite)
        kept = {u.device for u in finite}
        diverged = {u.device: "non-finite update" for u in updates if u.device not in kept}
        if not diverged:
            return result
        return dataclasses.replace(result, dropped={**result.dropped, **diverged})

    def accuracy(self, params: Mapping[str, np.ndarray], tier: int | None = None) -> float:
        """Test accuracy of the global model as tier ``tier`` (default: the
        deepest) sees it."""
        tier = self.tiers[-1] if tier is None else tier
        if self._test is None:  # once: scattering features are 159 MB
            self._test = evaluation_set(self.dataset.test_images, self.dataset.test_labels)
        correct = self._evaluate[tier](self.tier_params(params, tier), *self._test)
        return float(correct) / len(self.dataset.test_labels)
