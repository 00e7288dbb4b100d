"""Small helpers shared by the tests: run a transformation on a mesh or under pmap."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import ddp_jax


def per_device_grads(tree, n, seed=0):
  """A stacked tree: leaf shape (n, *shape), different values per device."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [jax.random.normal(k, (n,) + x.shape, jnp.float32).astype(x.dtype)
         if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.broadcast_to(x, (n,) + x.shape)
         for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def shard_map_updates(tx, stacked, mesh, axis, steps=1, params=None):
  """Runs ``tx.update`` ``steps`` times under shard_map; returns stacked updates, state."""
  params = jax.tree.map(lambda g: g[0], stacked) if params is None else params
  state = ddp_jax.init_state(tx, params, mesh, axis)
  specs = ddp_jax.state_specs(state, axis)

  def step(s, g):
    u, s = tx.update(jax.tree.map(lambda x: x[0], g), s, params)
    return jax.tree.map(lambda x: x[None], u), s

  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, P(axis)),
                            out_specs=(P(axis), specs)))
  g = ddp_jax.shard(stacked, mesh, axis)
  for _ in range(steps):
    u, state = f(state, g)
  return u, state


def pmap_updates(tx, stacked, axis="data"):
  params = jax.tree.map(lambda g: g[0], stacked)
  n = jax.tree.leaves(stacked)[0].shape[0]
  state = jax.pmap(tx.init)(jax.tree.map(lambda x: jnp.stack([x] * n), params))
  return jax.pmap(lambda g, s: tx.update(g, s), axis_name=axis)(stacked, state)


def assert_mean(updates, stacked, rtol=1e-6, atol=1e-6):
  """Every device's update equals the mean over devices (computed in float64)."""
  def check(u, g):
    want = np.mean(np.asarray(g, np.float64), axis=0)
    for row in np.asarray(u, np.float64):
      np.testing.assert_allclose(row, want, rtol=rtol, atol=atol)
  jax.tree.map(check, updates, stacked)


def stepper(tx, params, mesh, axis="data", extra_in=(), pass_params=False):
  """A jitted shard_map step ``(state, stacked grads, *extras) -> (stacked updates, state)``
  and its initial state. ``extra_in`` names per-replica extra args of ``tx.update``."""
  state = ddp_jax.init_state(tx, params, mesh, axis)
  specs = ddp_jax.state_specs(state, axis)

  def step(s, g, *extra):
    kwargs = {name: x[0] for name, x in zip(extra_in, extra)}
    u, s = tx.update(jax.tree.map(lambda x: x[0], g), s,
                     params if pass_params else None, **kwargs)
    return jax.tree.map(lambda x: x[None], u), s

  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, P(axis)) + (P(axis),) *
                             len(extra_in), out_specs=(P(axis), specs)))
  return fn, state
