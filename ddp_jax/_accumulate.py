"""``accumulate``: DDP's ``no_sync`` — sum k micro-batches locally, communicate once."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ddp_jax import _replica
from ddp_jax._plan import is_communicated


def _is_none(x) -> bool:
  return x is None


class AccumulateState(NamedTuple):
  mini_step: jax.Array  # int32 in [0, k)
  acc: Any  # this replica's running sum (per replica, leading replica axis)
  inner: Any  # the wrapped transformation's state


_replica.register_per_replica(AccumulateState, ("acc",))


def accumulate(tx: optax.GradientTransformation, k: int, *,
               average: bool = True) -> optax.GradientTransformationExtraArgs:
  """Accumulates ``k`` micro-batch gradients locally and runs ``tx`` once.

  Wrap the whole chain, sync included: on k-1 of every k steps nothing is
  communicated and the updates are zero; on the k-th, ``tx`` (and so its
  all-reduce) runs on the accumulated gradients inside a ``lax.cond`` branch.
  The local sums are per-replica state (``state_specs`` gives them
  ``P(axis)``).

  Args:
    tx: the transformation to run every k-th step, e.g.
      ``optax.chain(ddp_jax.sync_gradients("data"), optax.adam(1e-3))``.
    k: number of micro-batches per update (>= 1).
    average: pass the mean of the k gradients (True, like ``optax.MultiSteps``)
      or their sum (False, like gradients accumulated under DDP's ``no_sync``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, ddp_jax
    >>> tx = ddp_jax.accumulate(optax.chain(ddp_jax.sync_gradients("i"), optax.sgd(1.0)), 2)
    >>> def two_steps(g):
    ...   s = tx.init(g)
    ...   u1, s = tx.update(g, s)
    ...   u2, s = tx.update(3 * g, s)
    ...   return u1, u2
    >>> u1, u2 = jax.vmap(two_steps, axis_name="i")(jnp.arange(4.0))
    >>> print(u1, u2)
    [0. 0. 0. 0.] [-3. -3. -3. -3.]
  """
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"accumulate: k must be an int >= 1 (micro-batches per update), got {k!r}.")
  tx = optax.with_extra_args_support(tx)

  def zeros(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if is_communicated(x) else None,
                        tree)

  def init_fn(params):
    return AccumulateState(jnp.zeros((), jnp.int32), _replica.expand(zeros(params)),
                           tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    acc = jax.tree.map(lambda g, a: None if a is None else a + g.astype(a.dtype),
                       updates, _replica.squeeze(state.acc), is_leaf=_is_none)
    emit = state.mini_step == k - 1

    def grads_out(acc):
      # Accumulated leaves where there are any; the rest (ints, float0) as given now.
      return jax.tree.map(lambda g, a: g if a is None else (a / k if average else a),
                          updates, acc, is_leaf=_is_none)

    def do(acc, inner):
      return tx.update(grads_out(acc), inner, params, **extra_args)

    def skip(acc, inner):
      shapes = jax.eval_shape(lambda: do(acc, inner)[0])
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), inner

    new_updates, inner = lax.cond(emit, do, skip, acc, state.inner)
    acc = jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), acc)
    return new_updates, AccumulateState((state.mini_step + 1) % k, _replica.expand(acc), inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
