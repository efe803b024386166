"""Private, compressed local learning in JAX (DESIGN.md "Learning").

Data (:mod:`.data`, :mod:`.partition`), the tiered CNN family and a linear
model on fixed scattering features (:mod:`.models`, :mod:`.scattering`),
canonical model bytes and hash (:mod:`.serialize`),
DP-SGD and top-k as optax-style transformations (:mod:`.privacy`,
:mod:`.compression`), the privacy accountant and budget policy
(:mod:`.accountant`), deterministic aggregation rules (:mod:`.aggregation`),
vmapped local training (:mod:`.local`) and federated rounds without a
network (:mod:`.federated`).

Importing this package imports JAX; code that must start fast imports it
lazily.
"""

from fedchain.learning.accountant import (
    DpSgdSteps,
    LossAdaptiveBudget,
    PrivacyAccountant,
    PrivacySpent,
    calibrate_noise_multiplier,
    epsilon_for,
    gaussian_sigma_eq5,
)
from fedchain.learning.aggregation import (
    AggregateResult,
    Aggregator,
    ClientUpdate,
    CoordinateMedian,
    Krum,
    NormBound,
    TrimmedMean,
    VectorRule,
    WeightedMean,
    apply_delta,
    update_norm,
)
from fedchain.learning.compression import (
    SparseUpdate,
    TopKState,
    decode_sparse,
    decode_tensors,
    densify,
    encode_sparse,
    encode_tensors,
    top_k,
    top_k_count,
)
from fedchain.learning.data import Dataset, load_mnist, read_idx
from fedchain.learning.errors import (
    AggregationError,
    BudgetExhaustedError,
    ConfigError,
    DataError,
    DataWarning,
    LearningError,
    PayloadError,
    PrivacyAccountingError,
)
from fedchain.learning.federated import Device, Federation, FederationState, RoundReport
from fedchain.learning.local import DeviceData, LocalConfig, RoundOutput, make_local_round
from fedchain.learning.models import (
    DEVICE_CLASSES,
    CnnSpec,
    DevicePerformance,
    LinearSpec,
    ModelSpec,
    apply,
    choose_tier,
    init_params,
    tier_spec,
)
from fedchain.learning.partition import dirichlet, iid, shards
from fedchain.learning.privacy import (
    PAPER_CLIP_NORM,
    NoiseState,
    add_gaussian_noise,
    clip_per_example,
    normalize_by_batch,
    paper_learning_rate,
)
from fedchain.learning.scattering import scatter_images
from fedchain.learning.serialize import model_from_bytes, model_hash, model_to_bytes

__all__ = [
    "DEVICE_CLASSES",
    "PAPER_CLIP_NORM",
    "AggregateResult",
    "AggregationError",
    "Aggregator",
    "BudgetExhaustedError",
    "ClientUpdate",
    "CnnSpec",
    "ConfigError",
    "CoordinateMedian",
    "DataError",
    "DataWarning",
    "Dataset",
    "Device",
    "DeviceData",
    "DevicePerformance",
    "DpSgdSteps",
    "Federation",
    "FederationState",
    "Krum",
    "LearningError",
    "LinearSpec",
    "LocalConfig",
    "LossAdaptiveBudget",
    "ModelSpec",
    "NoiseState",
    "NormBound",
    "PayloadError",
    "PrivacyAccountant",
    "PrivacyAccountingError",
    "PrivacySpent",
    "RoundOutput",
    "RoundReport",
    "SparseUpdate",
    "TopKState",
    "TrimmedMean",
    "VectorRule",
    "WeightedMean",
    "add_gaussian_noise",
    "apply",
    "apply_delta",
    "calibrate_noise_multiplier",
    "choose_tier",
    "clip_per_example",
    "decode_sparse",
    "decode_tensors",
    "densify",
    "dirichlet",
    "encode_sparse",
    "encode_tensors",
    "epsilon_for",
    "gaussian_sigma_eq5",
    "iid",
    "init_params",
    "load_mnist",
    "make_local_round",
    "model_from_bytes",
    "model_hash",
    "model_to_bytes",
    "normalize_by_batch",
    "paper_learning_rate",
    "read_idx",
    "scatter_images",
    "shards",
    "tier_spec",
    "top_k",
    "top_k_count",
    "update_norm",
]
