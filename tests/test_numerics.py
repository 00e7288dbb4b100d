"""The numerics battery, shared by every hook of tests/test_hooks.py's HOOKS.

Non-finite gradients: one NaN or Inf in one element on one replica for one step. DDP's
all-reduce propagates it for that step only; here every hook's result for that step is
non-finite on every replica, and every hook state is left exactly as it was, so the
following finite steps equal (bit for bit) a run that never saw the bad step. Under
``shard_map`` and ``pmap``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddp_jax
from tests.helpers import per_device_grads, stepper
from tests.test_hooks import HOOKS, grads_tree, mesh_of

N = 4


def _with_bad_value(stacked, value):
  bad = dict(stacked)
  bad["kernel"] = bad["kernel"].at[2, 3, 5].set(value)  # one element, replica 2
  return bad


def _shard_map_runner(tx, mesh):
  fn, state = stepper(tx, grads_tree(), mesh)
  return lambda s, g: fn(s, ddp_jax.shard(g, mesh, "data")), state


def _pmap_runner(tx):
  params = grads_tree()
  state = jax.pmap(tx.init)(jax.tree.map(lambda x: jnp.stack([x] * N), params))
  fn = jax.pmap(lambda s, g: tx.update(g, s)[::-1], axis_name="data",
                devices=jax.devices()[:N])
  return lambda s, g: fn(s, g)[::-1], state


def _run(runner, state, grads):
  outs = []
  for g in grads:
    u, state = runner(state, g)
    outs.append(jax.tree.map(np.asarray, u))
  return outs, jax.tree.map(np.asarray, state)


@pytest.mark.parametrize("mapping", ["shard_map", "pmap"])
@pytest.mark.parametrize("name", sorted(HOOKS))
def test_nonfinite_steps_leave_state_and_later_steps_alone(name, mapping):
  """A NaN step, then an Inf step, between finite ones: the run equals one without them."""
  tx = ddp_jax.sync_gradients("data", hook=HOOKS[name][0]())
  runner, state0 = (_shard_map_runner(tx, mesh_of(N)) if mapping == "shard_map"
                    else _pmap_runner(tx))
  g = [per_device_grads(grads_tree(), N, seed=s) for s in range(3)]
  seen, state_seen = _run(runner, state0, [g[0], _with_bad_value(g[1], np.nan), g[1],
                                           _with_bad_value(g[2], np.inf), g[2]])
  clean, state_clean = _run(runner, state0, g)
  # The bad steps: non-finite on every replica, in the bucket that held the value.
  for step in (1, 3):
    for r in range(N):
      assert not np.all(np.isfinite(seen[step]["kernel"][r].astype(np.float32))), (step, r)
  # Otherwise as if they never happened: same results and same state, bit for bit.
  for got, want in zip([seen[2], seen[4]], clean[1:]):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=name), got, want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=name),
               state_seen.hook_states, state_clean.hook_states)
