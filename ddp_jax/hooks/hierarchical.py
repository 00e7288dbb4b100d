"""Hierarchical sync for meshes with a slow axis: compress only what crosses nodes."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from ddp_jax._validate import check_int
from ddp_jax.hooks._collectives import all_gather
from ddp_jax.hooks._protocol import (
  CommHook,
  GradBucket,
  HookContext,
  check_hook,
  configured,
  to_leaves,
)
from ddp_jax.hooks._wire import WireCost, reduce_scatter_bytes, wire_cost


@configured
def hierarchical(hook: CommHook, *, node_axis: str = "node", local_axis: str = "local",
                 local_size: int) -> CommHook:
  """Reduce-scatter inside the node, ``hook`` across nodes on the 1/L shard, all-gather
  inside the node.

  Use with ``sync_gradients((node_axis, local_axis), hook=hierarchical(...))`` on a 2-D
  mesh whose ``node_axis`` is the slow link: each device sums its 1/``local_size`` share
  of the bucket over the fast local axis, only that shard goes through ``hook`` (e.g.
  ``fp16_compress()``, ``int8_allreduce()``, ``topk(0.01)``) over ``node_axis``, and the
  reduced shards are gathered back over the local axis. The inner hook sees one 1-D leaf
  per bucket (the shard) and keeps its state per device (each owns another shard).

  Examples:
    >>> import ddp_jax.hooks as H
    >>> hook = hierarchical(H.fp16_compress(), node_axis="node", local_axis="local",
    ...                     local_size=4)
  """
  check_int(local_size, 1, "hierarchical: local_size")
  check_hook(hook, "hierarchical: hook")

  def shard_spec(spec):
    chunk = -(-spec.size // local_size)
    return dataclasses.replace(spec, leaf_indices=(0,), paths=(f"{spec.paths[0]}<shard>",),
                               shapes=((chunk,),))

  def init_fn(spec):
    return hook.init(shard_spec(spec))

  def update_fn(bucket, state, ctx):
    names = ctx.axis_name if isinstance(ctx.axis_name, tuple) else (ctx.axis_name,)
    if set(names) != {node_axis, local_axis}:
      raise ValueError(
          f"hierarchical: sync_gradients must average over ({node_axis!r}, {local_axis!r}); "
          f"got axis {ctx.axis_name!r}.")
    if lax.axis_size(local_axis) != local_size:
      raise ValueError(f"hierarchical: axis {local_axis!r} has {lax.axis_size(local_axis)} "
                       f"devices, local_size says {local_size}.")
    nodes = lax.axis_size(node_axis)
    sub = shard_spec(bucket.spec)
    chunk = sub.shapes[0][0]
    x = jnp.pad(bucket.buffer(), (0, chunk * local_size - bucket.size))
    shard = lax.psum_scatter(x, local_axis, scatter_dimension=0, tiled=True) / local_size
    inner_ctx = HookContext(node_axis, nodes, predivide_factor=ctx.predivide_factor,
                            warm_up=ctx.warm_up)
    inner_bucket = GradBucket(sub, [shard], ((0,),))
    reduced, state = hook.update(inner_bucket, state, inner_ctx)
    (reduced,) = to_leaves(reduced, inner_bucket)
    full = all_gather(reduced.astype(bucket.dtype), local_axis, tiled=True)[: bucket.size]
    if ctx.num_participating is not None:  # the hook averaged over everyone
      full = full * (ctx.axis_size / ctx.num_participating.astype(jnp.float32)).astype(full.dtype)
    return full, state

  def wire_fn(spec, world):
    nodes = max(1, world // local_size)
    sub = shard_spec(spec)
    inner = wire_cost(hook, sub, nodes)
    local = 2 * reduce_scatter_bytes(spec.nbytes, local_size)  # reduce-scatter + all-gather
    return WireCost(inner.bytes + local, inner.collectives + 2)

  return CommHook(init_fn, update_fn, wire_fn)
