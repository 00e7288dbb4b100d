"""``accumulate``: DDP's ``no_sync`` — sum k micro-batches locally, communicate once."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ddp_jax import _replica
from ddp_jax._plan import is_communicated
from ddp_jax._validate import check_int


def _is_none(x) -> bool:
  return x is None


class AccumulateState(NamedTuple):
  mini_step: jax.Array  # int32 in [0, k)
  acc: Any  # this replica's running sum (per replica, leading replica axis)
  inner: Any  # the wrapped transformation's state
  weight: jax.Array  # int32 (per replica, leading replica axis): micro-steps in ``acc``


_replica.register_per_replica(AccumulateState, ("acc", "weight"))


def accumulate(tx: optax.GradientTransformation, k: int, *,
               average: bool = True) -> optax.GradientTransformationExtraArgs:
  """Accumulates ``k`` micro-batch gradients locally and runs ``tx`` once.

  Wrap the whole chain, sync included: on k-1 of every k steps nothing is
  communicated and the updates are zero; on the k-th, ``tx`` (and so its
  all-reduce) runs on the accumulated gradients inside a ``lax.cond`` branch.
  The local sums are per-replica state (``state_specs`` gives them
  ``P(axis)``).

  Uneven inputs: pass ``participating=`` (this replica's bool) on *every*
  micro-step. A replica adds only the micro-batches it took part in, and the
  update is the mean over all (replica, micro-step) pairs that took part (times
  k with ``average=False``): exactly one device's training on the data that
  exists. The sync receives each replica's count as its weight (see
  :func:`~ddp_jax.sync_gradients`).

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
  check_int(k, 1, "accumulate: k", " (micro-batches per update)")
  tx = optax.with_extra_args_support(tx)

  def zeros(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if is_communicated(x) else None,
                        tree)

  def init_fn(params):
    return AccumulateState(jnp.zeros((), jnp.int32), _replica.expand(zeros(params)),
                           tx.init(params), _replica.expand(jnp.zeros((), jnp.int32)))

  def update_fn(updates, state, params=None, participating=None, **extra_args):
    took_part = jnp.asarray(True if participating is None else participating)
    if took_part.shape != () or not (took_part.dtype == jnp.bool_
                                     or jnp.issubdtype(took_part.dtype, jnp.integer)):
      raise ValueError(
          f"accumulate: participating must be this replica's scalar bool for the "
          f"micro-step, got {took_part.dtype}{list(took_part.shape)}.")
    took_part = took_part.astype(jnp.bool_)
    if participating is not None:  # an idle micro-step adds nothing
      updates = jax.tree.map(
          lambda g: jnp.where(took_part, g, jnp.zeros_like(g)) if is_communicated(g) else g,
          updates)
    acc = jax.tree.map(lambda g, a: None if a is None else a + g.astype(a.dtype),
                       updates, _replica.squeeze(state.acc), is_leaf=_is_none)
    weight = _replica.squeeze(state.weight) + took_part.astype(jnp.int32)
    emit = state.mini_step == k - 1

    def grads_out(acc):
      # Accumulated leaves where there are any; the rest (ints, float0) as given now.
      if participating is None:  # every replica took every micro-step: the mean is /k
        scale = lambda a: a / k if average else a  # noqa: E731
      else:  # sums; the sync divides by the total weight (and k x that for sums)
        scale = lambda a: a if average else a * k  # noqa: E731
      return jax.tree.map(lambda g, a: g if a is None else scale(a), updates, acc,
                          is_leaf=_is_none)

    def do(acc, inner):
      extra = extra_args if participating is None else dict(extra_args, participating=weight)
      return tx.update(grads_out(acc), inner, params, **extra)

    def skip(acc, inner):
      shapes = jax.eval_shape(lambda: do(acc, inner)[0])
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), inner

    new_updates, inner = lax.cond(emit, do, skip, acc, state.inner)
    acc = jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), acc)
    weight = jnp.where(emit, 0, weight)
    return new_updates, AccumulateState((state.mini_step + 1) % k, _replica.expand(acc), inner,
                                        _replica.expand(weight))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
