"""What a hook costs on the wire: bytes one replica sends per step, from shapes alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from ddp_jax._plan import BucketSpec

if TYPE_CHECKING:
  from ddp_jax.hooks._protocol import CommHook


class WireCost(NamedTuple):
  """What one bucket costs on the wire per step: bytes one replica sends, assuming
  the bandwidth-optimal ring algorithms (see :func:`allreduce_bytes`, ...)."""

  bytes: float
  collectives: int  # collective calls


def allreduce_bytes(nbytes: int, world: int) -> float:
  """A ring all-reduce of ``nbytes``: each replica sends ``2 (N-1)/N`` of it."""
  return 2 * (world - 1) / world * nbytes


def allgather_bytes(nbytes: int, world: int) -> float:
  """An all-gather of ``nbytes`` per replica: each sends ``(N-1) x nbytes``."""
  return (world - 1) * nbytes


def reduce_scatter_bytes(nbytes: int, world: int) -> float:
  """A ring reduce-scatter of ``nbytes``: each replica sends ``(N-1)/N`` of it."""
  return (world - 1) / world * nbytes


def wire_cost(hook: CommHook, spec: BucketSpec, world_size: int) -> WireCost:
  """The hook's static traffic for one bucket (all-reduce of the bucket by default)."""
  wire = hook.wire
  if wire is None:
    return WireCost(allreduce_bytes(spec.nbytes, world_size), 1)
  return WireCost(*wire(spec, world_size))
