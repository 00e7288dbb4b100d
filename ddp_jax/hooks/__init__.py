"""Communication hooks: how a bucket of gradients is reduced across replicas."""

from ddp_jax.hooks._base import CommHook, GradBucket, HookContext
from ddp_jax.hooks.default import allreduce, noop

__all__ = ["CommHook", "GradBucket", "HookContext", "allreduce", "noop"]
