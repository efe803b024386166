"""The public surface of fedchain.learning is what we mean it to be."""

from __future__ import annotations

import subprocess
import sys

import fedchain.learning as learning
from fedchain.learning import errors


def test_all_names_exist_and_are_sorted():
    assert sorted(learning.__all__) == sorted(set(learning.__all__))
    for name in learning.__all__:
        assert getattr(learning, name) is not None


def test_expected_surface():
    expected = {
        "load_mnist", "iid", "dirichlet", "shards", "CnnSpec", "tier_spec", "choose_tier",
        "init_params", "apply", "model_hash", "model_to_bytes", "model_from_bytes",
        "clip_per_example", "add_gaussian_noise", "normalize_by_batch", "top_k",
        "encode_sparse", "decode_sparse", "PrivacyAccountant", "calibrate_noise_multiplier",
        "LossAdaptiveBudget", "WeightedMean", "CoordinateMedian", "TrimmedMean", "Krum",
        "NormBound", "LocalConfig", "make_local_round", "Federation",
    }  # fmt: skip
    assert expected <= set(learning.__all__)


def test_errors_are_one_family():
    for name in errors.__all__:
        cls = getattr(errors, name)
        if name != "DataWarning":
            assert issubclass(cls, errors.LearningError)
    assert errors.DataError("bad", "/x/y").path.name == "y"
    assert "/x/y" in str(errors.DataError("bad", "/x/y"))


def test_no_networking_imports():
    code = (
        "import sys, fedchain.learning, fedchain.learning.federated;"
        "net=('fedchain.p2p','fedchain.consensus','trio');"
        "bad=[m for m in sys.modules if m.startswith(net)];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
