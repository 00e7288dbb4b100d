"""Post-local SGD (DDP's ``post_localSGD_hook``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from ddp_jax._validate import check_int
from ddp_jax.hooks._collectives import as_varying, divide
from ddp_jax.hooks._protocol import CommHook, configured


class LocalSGDState(NamedTuple):
  """:func:`post_local_sgd`'s state: this bucket's update count."""

  iter: Any


@configured
def post_local_sgd(start_iter: int, local_axis) -> CommHook:
  """Global all-reduce until ``start_iter``, then all-reduce only within ``local_axis``
  (e.g. the devices of one node on a ``("node", "local")`` mesh). Replicas of different
  groups then drift apart: average their parameters now and then with
  :func:`ddp_jax.periodic_model_average` (DDP's ``PeriodicModelAverager``).

  Examples:
    >>> hook = post_local_sgd(start_iter=100, local_axis="local")
  """
  check_int(start_iter, 0, "post_local_sgd: start_iter")

  def mean_over(x, axis, ctx):
    if ctx.participating is None:
      return lax.psum(x, axis) / lax.psum(1, axis)
    count = lax.psum(ctx.weight, axis)  # the weights of this group's replicas
    return divide(lax.psum(x, axis), jnp.maximum(count, 1))

  def update_fn(bucket, state, ctx):
    x = bucket.buffer()  # an idle replica's bucket is already zeros
    reduced = lax.cond(state.iter < start_iter,
                       lambda v: as_varying(mean_over(v, ctx.axis_name, ctx), ctx.axis_name),
                       lambda v: as_varying(mean_over(v, local_axis, ctx), ctx.axis_name), x)
    return reduced.astype(bucket.dtype), LocalSGDState(state.iter + 1)

  return CommHook(lambda spec: LocalSGDState(jnp.zeros((), jnp.int32)), update_fn)
