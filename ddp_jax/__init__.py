"""ddp_jax: PyTorch DDP's bucketed gradient synchronization, as optax transformations."""

from ddp_jax import hooks, inspect
from ddp_jax._accumulate import AccumulateState, accumulate
from ddp_jax._averaging import PeriodicAverageState, periodic_model_average
from ddp_jax._config import SyncConfig
from ddp_jax._data import global_batch, shard_indices
from ddp_jax._distributed import (
    broadcast_from_process0,
    broadcast_params,
    initialize,
    sync_buffers,
    verify_replicas,
)
from ddp_jax._grad import grad, value_and_grad
from ddp_jax._plan import BucketPlan, BucketSpec, compute_bucket_assignment_by_size, plan_buckets
from ddp_jax._replica import init_state, replicate, resize_state, shard, state_specs
from ddp_jax._step import DataParallelStep, data_parallel
from ddp_jax._sync import (
    SyncGradients,
    SyncState,
    SyncStats,
    describe,
    sync_gradients,
    verify_sync,
)

__version__ = "0.1.0"

__all__ = [
    "AccumulateState",
    "PeriodicAverageState",
    "periodic_model_average",
    "accumulate",
    "broadcast_from_process0",
    "broadcast_params",
    "initialize",
    "sync_buffers",
    "verify_replicas",
    "verify_sync",
    "BucketPlan",
    "BucketSpec",
    "SyncConfig",
    "SyncGradients",
    "SyncState",
    "SyncStats",
    "compute_bucket_assignment_by_size",
    "DataParallelStep",
    "data_parallel",
    "describe",
    "global_batch",
    "grad",
    "shard_indices",
    "hooks",
    "init_state",
    "inspect",
    "plan_buckets",
    "replicate",
    "resize_state",
    "shard",
    "state_specs",
    "sync_gradients",
    "value_and_grad",
]
