"""``periodic_model_average``: DDP's ``PeriodicModelAverager`` as an optax transformation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ddp_jax._axes import check_axis_name
from ddp_jax._validate import check_int


class PeriodicAverageState(NamedTuple):
  count: jax.Array  # int32: updates seen


def periodic_model_average(period: int, axis_name) -> optax.GradientTransformation:
  """Every ``period`` steps, replaces the parameters by their average over ``axis_name``.

  Put it last in the chain (it turns ``updates`` into ``mean(params + updates) - params``
  on averaging steps and passes them through otherwise). With
  :func:`ddp_jax.hooks.post_local_sgd` this is DDP's post-local SGD.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> tx = periodic_model_average(2, "i")
    >>> def two(p):
    ...   s = tx.init(p)
    ...   u1, s = tx.update(jnp.zeros_like(p), s, p)
    ...   u2, s = tx.update(jnp.zeros_like(p), s, p)
    ...   return u1, u2
    >>> u1, u2 = jax.vmap(two, axis_name="i")(jnp.array([0.0, 2.0]))
    >>> print(u1, u2)
    [0. 0.] [ 1. -1.]
  """
  check_int(period, 1, "periodic_model_average: period")
  check_axis_name(axis_name)

  def init_fn(params):
    del params
    return PeriodicAverageState(jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("periodic_model_average needs params: tx.update(updates, state, params).")
    count = state.count + 1

    def average(u):
      new = jax.tree.map(lambda p, d: p + d, params, u)
      return jax.tree.map(lambda m, p: m - p, lax.pmean(new, axis_name), params)

    updates = lax.cond(count % period == 0, average, lambda u: u, updates)
    return updates, PeriodicAverageState(count)

  return optax.GradientTransformation(init_fn, update_fn)
