"""Hierarchical sync on a 2 x 4 ("node", "local") mesh: only the shard crosses nodes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ddp_jax
from ddp_jax import hooks
from ddp_jax.inspect import collectives
from tests.helpers import assert_mean, per_device_grads

AXES = ("node", "local")


def tree():
  return {"w": jnp.zeros((30, 20)), "b": jnp.zeros((20,))}  # 620 floats: 155 per shard


def run(tx, g, mesh, flags=None):
  params = jax.tree.map(lambda x: x[0], g)
  state = ddp_jax.init_state(tx, params, mesh, AXES)
  specs = ddp_jax.state_specs(state, AXES)

  def step(s, g, *f):
    kw = {"participating": f[0][0]} if f else {}
    return tx.update(jax.tree.map(lambda x: x[0], g), s, **kw)

  extra = () if flags is None else (ddp_jax.shard(flags, mesh, AXES),)
  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, P(AXES)) + (P(AXES),) * len(extra),
                             out_specs=(P(), specs)))
  args = (state, ddp_jax.shard(g, mesh, AXES)) + extra
  return fn(*args), fn, args


def test_exact_inner_hook_gives_the_mean(mesh2x4):
  tx = ddp_jax.sync_gradients(AXES, hook=hooks.hierarchical(hooks.allreduce(), local_size=4))
  g = per_device_grads(tree(), 8, seed=1)
  (u, _), _, _ = run(tx, g, mesh2x4)
  assert_mean(jax.tree.map(lambda x: np.asarray(x)[None], u), g, rtol=1e-5, atol=1e-6)


def test_only_the_compressed_shard_crosses_nodes(mesh2x4):
  tx = ddp_jax.sync_gradients(AXES, hook=hooks.hierarchical(hooks.fp16_compress(),
                                                            local_size=4))
  g = per_device_grads(tree(), 8, seed=2)
  (u, _), fn, args = run(tx, g, mesh2x4)
  assert_mean(jax.tree.map(lambda x: np.asarray(x)[None], u), g, rtol=0, atol=3e-3)
  report = collectives(fn, *args).lowered
  # Across nodes (groups of 2 replicas): one f16 shard of 155 elements per bucket, summed
  # on CPU by an all-to-all and an all-gather of its 16-bit words (hooks._collectives.sum_16bit;
  # padded to 156, a multiple of 2): a ring all-reduce's bytes.
  assert "all-reduce" not in report
  assert report["all-to-all"].bytes_by_group_size == {2: 156 * 2}
  assert report["reduce-scatter"].bytes_by_group_size == {4: 155 * 4}
  assert report["all-gather"].bytes_by_group_size == {2: 156 * 2, 4: 620 * 4}
  plan = ddp_jax.plan_buckets(tree())
  flat_f32 = hooks.wire_bytes(hooks.allreduce(), plan, 2)[0].bytes  # all of it across 2 nodes
  # Each device's node link carries 1/8 of what a flat f32 all-reduce would send over it.
  assert hooks.allreduce_bytes(155 * 2, 2) * 8 == flat_f32


def test_participation(mesh2x4):
  tx = ddp_jax.sync_gradients(AXES, hook=hooks.hierarchical(hooks.allreduce(), local_size=4))
  g = per_device_grads(tree(), 8, seed=3)
  flags = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
  (u, _), _, _ = run(tx, g, mesh2x4, flags)
  want = jax.tree.map(lambda x: np.asarray(x)[flags], g)
  assert_mean(jax.tree.map(lambda x: np.asarray(x)[None], u), want, rtol=1e-5, atol=1e-6)


def test_errors(mesh2x4):
  with pytest.raises(ValueError, match="local_size must be an int >= 1"):
    hooks.hierarchical(hooks.allreduce(), local_size=0)
  g = per_device_grads(tree(), 8)
  bad = ddp_jax.sync_gradients(AXES, hook=hooks.hierarchical(hooks.allreduce(), local_size=2))
  with pytest.raises(ValueError, match="axis 'local' has 4 devices, local_size says 2"):
    run(bad, g, mesh2x4)
  one_axis = ddp_jax.sync_gradients("local", hook=hooks.hierarchical(hooks.allreduce(),
                                                                      local_size=4))
  with pytest.raises(ValueError, match=r"must average over \('node', 'local'\)"):
    jax.jit(jax.shard_map(lambda g: one_axis.update(jax.tree.map(lambda x: x[0], g),
                                                    one_axis.init(tree()))[0],
                          mesh=mesh2x4, in_specs=P(AXES), out_specs=P()))(
                              ddp_jax.shard(g, mesh2x4, AXES))
