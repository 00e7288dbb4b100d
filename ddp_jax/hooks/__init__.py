"""Communication hooks: how a bucket of gradients is reduced across replicas."""

from ddp_jax.hooks._base import CommHook, GradBucket, HookContext, WireCost, wire_cost
from ddp_jax.hooks.default import allreduce, noop

__all__ = [
    "CommHook", "GradBucket", "HookContext", "WireCost", "allreduce", "noop", "wire_cost",
    "wire_bytes",
]


def wire_bytes(hook: CommHook, plan, world_size: int) -> list[WireCost]:
  """Per bucket of ``plan``: the bytes and collective calls ``hook`` costs a replica
  per step, from shapes alone (nothing runs)."""
  return [wire_cost(hook, spec, world_size) for spec in plan.buckets]
