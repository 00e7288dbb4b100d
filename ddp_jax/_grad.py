"""``value_and_grad`` / ``grad``: per-replica gradients by construction.

Under ``jax.shard_map`` (default ``check_vma=True``), ``jax.grad`` of a
replicated (``P()``) parameter against per-replica data already sums the
gradient over the mesh axis: autodiff transposes the implicit cast to varying
into a ``psum``. Averaging that again gives N times the gradient, and the
compiled step holds autodiff's f32 all-reduce besides the hook's. These
wrappers differentiate per-replica (varying) copies of the differentiated
arguments instead, so autodiff inserts no collective and
:func:`~ddp_jax.sync_gradients` is the only gradient communication, as in
PyTorch DDP. Under ``jax.pmap``, ``jax.vmap`` or ``check_vma=False`` the cast
is a no-op and they are ``jax.value_and_grad`` / ``jax.grad``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax

from ddp_jax._axes import axis_size, check_axis_name, to_varying


def value_and_grad(fun: Callable, axis_name, argnums: int | Sequence[int] = 0,
                   has_aux: bool = False, **kwargs) -> Callable:
  """``jax.value_and_grad`` whose gradients stay per replica over ``axis_name``.

  Same arguments (``holomorphic``, ``allow_int`` pass through) and results as
  ``jax.value_and_grad``; the differentiated arguments are cast to varying over
  ``axis_name`` first (``jax.lax.pcast(x, axis, to="varying")``, no data
  moves), so each replica gets the gradient of *its own* loss, ready for
  :func:`~ddp_jax.sync_gradients`. The value is this replica's loss: reduce it
  with ``lax.pmean`` for logging, *outside* ``fun`` (a ``pmean`` inside would
  scale the gradients by 1/N).

  Args:
    fun: the per-replica loss, e.g. ``loss(params, batch)``.
    axis_name: the mesh axis (or tuple of axes) the replicas are mapped over.
    argnums: which positional arguments to differentiate (as in jax).
    has_aux: ``fun`` returns ``(value, aux)`` (as in jax).
    **kwargs: ``holomorphic``, ``allow_int``: passed to ``jax.value_and_grad``.

  Returns:
    A function returning ``(value, grads)`` (``((value, aux), grads)`` with
    ``has_aux``), to call inside ``jax.shard_map`` / ``jax.pmap`` over
    ``axis_name``.

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np, ddp_jax
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((8,), ("data",))
    >>> loss = lambda w, x: jnp.mean((x @ w) ** 2)
    >>> def local_grads(w, x):
    ...   value, g = ddp_jax.value_and_grad(loss, "data")(w, x)
    ...   return g[None]                      # one gradient per replica
    >>> w, x = jnp.ones(3), jnp.arange(48.0).reshape(16, 3) / 48
    >>> per_replica = jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), P("data")),
    ...                             out_specs=P("data"))(w, ddp_jax.shard(x, mesh, "data"))
    >>> bool(np.allclose(per_replica.mean(0), jax.grad(loss)(w, x), rtol=1e-5))
    True
  """
  check_axis_name(axis_name)
  value_and_grad_fn = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux, **kwargs)
  nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

  @functools.wraps(fun)
  def wrapped(*args, **fun_kwargs):
    axis_size(axis_name, "ddp_jax.value_and_grad")
    args = list(args)
    for i in nums:
      if -len(args) <= i < len(args):  # out of range: jax's own error follows
        args[i] = to_varying(args[i], axis_name)
    return value_and_grad_fn(*args, **fun_kwargs)

  return wrapped


def grad(fun: Callable, axis_name, argnums: int | Sequence[int] = 0, has_aux: bool = False,
         **kwargs) -> Callable:
  """``jax.grad`` whose gradients stay per replica over ``axis_name``.

  See :func:`value_and_grad`; returns ``grads`` (``(grads, aux)`` with
  ``has_aux``), like ``jax.grad``.

  Examples:
    >>> import jax, jax.numpy as jnp, ddp_jax
    >>> g = jax.vmap(ddp_jax.grad(lambda w, x: w * x, "i"), axis_name="i")
    >>> print(g(jnp.ones(4), jnp.arange(4.0)))   # under vmap: plain jax.grad
    [0. 1. 2. 3.]
  """
  value_and_grad_fn = value_and_grad(fun, axis_name, argnums, has_aux, **kwargs)

  @functools.wraps(fun)
  def wrapped(*args, **fun_kwargs):
    value, grads = value_and_grad_fn(*args, **fun_kwargs)
    return (grads, value[1]) if has_aux else grads

  return wrapped
