"""ddp_jax: PyTorch DDP's bucketed gradient synchronization, as optax transformations."""

from ddp_jax import hooks, inspect
from ddp_jax._plan import BucketPlan, BucketSpec, compute_bucket_assignment_by_size, plan_buckets
from ddp_jax._sync import (
    SyncState,
    init_state,
    replicate,
    shard,
    state_specs,
    sync_gradients,
)

__version__ = "0.1.0"

__all__ = [
    "BucketPlan",
    "BucketSpec",
    "SyncState",
    "compute_bucket_assignment_by_size",
    "hooks",
    "init_state",
    "inspect",
    "plan_buckets",
    "replicate",
    "shard",
    "state_specs",
    "sync_gradients",
]
