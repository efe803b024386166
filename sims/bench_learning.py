"""``fedchain bench learning``: one federated round against centralized DP
training of the same samples.

A round of N devices (the paper's mix: 15 of every 40 are phones on tier 0,
the rest computers on tier 2) runs as one jitted, vmapped call per tier. The
baseline trains, for each tier, ONE model on the union of that tier's
samples with the same DP-SGD (per-example clipping, noise, Poisson
sampling) for the same number of steps at N_tier times the batch, so both
sides compute the same number of per-example gradients of the same
architectures. The ratio (federated / centralized wall time, after
compilation) says what simulating devices separately costs; the target is
<= 1.3. Reported for 40 and 400 devices, as a table and one JSON line.
"""

from __future__ import annotations

import argparse
import time

from .arguments import int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="folder with the MNIST IDX files (else FEDCHAIN_DATA...)")
    parser.add_argument("--devices", type=int_at_least(1), nargs="+", default=[40, 400])
    parser.add_argument(
        "--steps", type=int_at_least(1), default=10, help="local DP-SGD steps per round"
    )
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=32, help="expected batch per device"
    )
    parser.add_argument(
        "--repeat", type=int_at_least(1), default=2, help="timed rounds (after a warm-up)"
    )
    parser.add_argument("--seed", type=int_at_least(0), default=0)


def _time_rounds(round_fn, params, data, n, residual, repeat, jax, jnp):
    keys = jax.random.split(jax.random.key(0), n)
    start = time.perf_counter()
    jax.block_until_ready(round_fn(params, data, keys, jnp.ones(n), 0.5, residual))
    compile_s = time.perf_counter() - start
    best = float("inf")
    for r in range(repeat):
        keys = jax.random.split(jax.random.key(r + 1), n)
        start = time.perf_counter()
        jax.block_until_ready(round_fn(params, data, keys, jnp.ones(n), 0.5, residual))
        best = min(best, time.perf_counter() - start)
    return best, compile_s


def run(args: argparse.Namespace) -> int:
    from fedchain.learning.errors import ConfigError

    try:
        return _run(args)
    except ConfigError as exc:  # a setting out of range: say which, no traceback
        raise SystemExit(f"fedchain bench learning: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fedchain.learning import partition
    from fedchain.learning.data import load_mnist
    from fedchain.learning.local import LocalConfig, make_local_round, pad_devices, zero_residual
    from fedchain.learning.models import CnnSpec, init_params, tier_spec
    from fedchain.sims.report import emit_json, print_table

    data = load_mnist(args.data)
    base = CnnSpec(conv1=8, conv2=16, hidden=32)
    rows, figures = [], {}
    for n in args.devices:
        phones = round(n * 15 / 40)
        parts = partition.iid(len(data.train_labels), n, args.seed)
        tiers = {0: parts[:phones], 2: parts[phones:]}
        fed_s = central_s = compile_s = 0.0
        examples = 0
        for tier, tier_parts in tiers.items():
            spec = tier_spec(tier, base)
            params = init_params(jax.random.key(args.seed), spec)
            cfg = LocalConfig(steps=args.steps, batch_size=args.batch_size, clip_norm=1.0)
            fed_data = pad_devices(data.train_images, data.train_labels, tier_parts)
            t, c = _time_rounds(
                make_local_round(spec, cfg),
                params,
                fed_data,
                len(tier_parts),
                zero_residual(spec, len(tier_parts)),
                args.repeat,
                jax,
                jnp,
            )
            fed_s += t
            compile_s += c
            del fed_data
            union = np.sort(np.concatenate(tier_parts))
            central_cfg = LocalConfig(
                steps=args.steps, batch_size=args.batch_size * len(tier_parts), clip_norm=1.0
            )
            t, c = _time_rounds(
                make_local_round(spec, central_cfg),
                params,
                pad_devices(data.train_images, data.train_labels, [union]),
                1,
                zero_residual(spec, 1),
                args.repeat,
                jax,
                jnp,
            )
            central_s += t
            examples += args.steps * args.batch_size * len(tier_parts)
        ratio = fed_s / central_s
        rows.append(
            [n, f"{phones}/{n - phones}", fed_s, central_s, ratio, examples / fed_s, compile_s]
        )
        figures[f"devices_{n}"] = {
            "round_s": round(fed_s, 4),
            "centralized_s": round(central_s, 4),
            "ratio": round(ratio, 3),
            "examples_per_s": round(examples / fed_s, 1),
            "centralized_examples_per_s": round(examples / central_s, 1),
            "compile_s": round(compile_s, 2),
        }
    print_table(
        f"one DP round ({args.steps} local steps, batch {args.batch_size}) vs centralized DP"
        + (" [MNIST SUBSET]" if data.is_subset else ""),
        ["devices", "phones/computers", "round s", "centralized s", "ratio", "ex/s", "compile s"],
        rows,
    )
    emit_json(
        "learning",
        {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "data": "subset" if data.is_subset else "mnist",
            "backend": jax.default_backend(),
            **figures,
        },
    )
    return 0
