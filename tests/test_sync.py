"""sync_gradients: equals pmean, on shard_map and pmap, 1-D and 2-D meshes, every pack mode."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import ddp_jax
from ddp_jax import hooks
from tests.helpers import assert_mean, per_device_grads, pmap_updates, shard_map_updates


def model_tree():
  return {
      "embed": jnp.zeros((300, 64)),
      "block": [{"kernel": jnp.zeros((64, 64)), "bias": jnp.zeros((64,))} for _ in range(3)],
      "head": {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros((10,))},
      "scale": jnp.zeros(()),
  }


def mixed_tree():
  return {
      "f32": jnp.zeros((40, 30)),
      "bf16": jnp.zeros((50, 7), jnp.bfloat16),
      "f16": jnp.zeros((33,), jnp.float16),
      "f32b": jnp.zeros((5,)),
  }


TOL = {np.dtype(jnp.float32): 1e-6, np.dtype(jnp.bfloat16): 2e-2, np.dtype(jnp.float16): 2e-3}


def assert_mean_by_dtype(updates, stacked):
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(stacked)):
    assert u.dtype == g.dtype
    tol = TOL[np.dtype(g.dtype)]
    assert_mean(u, g, rtol=tol, atol=tol)


@pytest.mark.parametrize("pack", ["auto", "ravel", "variadic"])
def test_equals_pmean_shard_map(mesh8, pack):
  tx = ddp_jax.sync_gradients("data", pack=pack, first_bucket_cap_mb=0.01, bucket_cap_mb=0.02)
  g = per_device_grads(model_tree(), 8)
  u, _ = shard_map_updates(tx, g, mesh8, "data")
  assert_mean(u, g)


def test_equals_lax_pmean_exactly_shaped(mesh8):
  """Side by side with lax.pmean inside the same shard_map."""
  tx = ddp_jax.sync_gradients("data")
  g = ddp_jax.shard(per_device_grads(model_tree(), 8), mesh8, "data")

  def both(gs):
    gs = jax.tree.map(lambda x: x[0], gs)
    ours, _ = tx.update(gs, tx.init(gs))
    return ours, lax.pmean(gs, "data")

  ours, ref = jax.jit(jax.shard_map(both, mesh=mesh8, in_specs=P("data"), out_specs=P()))(g)
  chex.assert_trees_all_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_mixed_dtypes_keep_dtype(mesh8):
  tx = ddp_jax.sync_gradients("data")
  plan = ddp_jax.plan_buckets(mixed_tree())
  assert sorted(b.dtype.name for b in plan.buckets) == ["bfloat16", "float16", "float32"]
  g = per_device_grads(mixed_tree(), 8)
  u, _ = shard_map_updates(tx, g, mesh8, "data")
  assert_mean_by_dtype(u, g)


@pytest.mark.parametrize("pack", ["auto", "ravel", "variadic"])
def test_equals_pmean_pmap(pack):
  tx = ddp_jax.sync_gradients("data", pack=pack, first_bucket_cap_mb=0.01)
  g = per_device_grads(mixed_tree(), 8)
  u, state = pmap_updates(tx, g)
  assert_mean_by_dtype(u, g)
  assert isinstance(state, ddp_jax.SyncState)


def test_2d_mesh_both_axes(mesh2x4):
  axes = ("node", "local")
  tx = ddp_jax.sync_gradients(axes)
  g = per_device_grads(model_tree(), 8)
  u, _ = shard_map_updates(tx, g, mesh2x4, axes)
  assert_mean(u, g)


def test_2d_mesh_one_axis(mesh2x4):
  """Averaging over 'local' only: the mean of each node's 4 devices."""
  tx = ddp_jax.sync_gradients("local")
  g = per_device_grads(model_tree(), 8)
  params = jax.tree.map(lambda x: x[0], g)
  state = jax.jit(jax.shard_map(tx.init, mesh=mesh2x4, in_specs=P(), out_specs=P()))(
      ddp_jax.replicate(params, mesh2x4))

  def step(s, gs):
    u, _ = tx.update(jax.tree.map(lambda x: x[0], gs), s)
    return jax.tree.map(lambda x: x[None], u)

  axes = ("node", "local")
  f = jax.jit(jax.shard_map(step, mesh=mesh2x4, in_specs=(P(), P(axes)), out_specs=P(axes)))
  u = f(state, ddp_jax.shard(g, mesh2x4, axes))
  for node in range(2):
    part = slice(4 * node, 4 * node + 4)
    assert_mean(jax.tree.map(lambda x: np.asarray(x)[part], u),  # noqa: B023,
                jax.tree.map(lambda x: np.asarray(x)[part], g))  # noqa: B023


def test_vmap_axis_and_passthrough_leaves():
  """None, float0, integer, zero-size leaves pass through; scalars are averaged."""
  grads = {
      "w": jnp.arange(8.0).reshape(8, 1),
      "s": jnp.arange(8.0),  # a scalar per replica
      "none": None,
      "i": jnp.arange(8, dtype=jnp.int32),
      "f0": np.zeros((8, 2), dtype=jax.dtypes.float0),
      "empty": jnp.zeros((8, 0)),
  }
  tx = ddp_jax.sync_gradients("i")
  out = jax.vmap(lambda g: tx.update(g, tx.init(g))[0], axis_name="i")(grads)
  np.testing.assert_allclose(out["w"][:, 0], 3.5)
  np.testing.assert_allclose(out["s"], 3.5)
  assert out["none"] is None
  np.testing.assert_array_equal(out["i"], np.arange(8))
  assert out["f0"].dtype == jax.dtypes.float0 and out["empty"].shape == (8, 0)


def test_operands_per_pack_mode():
  spec = ddp_jax.plan_buckets([jnp.zeros((1024, 512)), jnp.zeros(10), jnp.zeros(20)],
                              bucket_cap_mb=100, first_bucket_cap_mb=100,
                              order="forward").buckets[0]
  from ddp_jax import _pack
  assert _pack.operand_groups(spec, "ravel") == ((0, 1, 2),)
  assert _pack.operand_groups(spec, "variadic") == ((0,), (1,), (2,))
  # 2 MiB leaf travels alone; the small ones share one buffer.
  assert _pack.operand_groups(spec, "auto") == ((1, 2), (0,))
  assert _pack.operand_groups(spec, "auto", ravel_below=41) == ((1,), (0,), (2,))
  assert _pack.operand_groups(spec, "auto", ravel_below=1 << 22) == ((0, 1, 2),)


def summing_hook():
  """A stateful test hook: allreduce, and remember the local (per-replica) sum."""
  inner = hooks.allreduce()

  def init_fn(spec):
    return {"seen": jnp.zeros((spec.size,), spec.dtype), "steps": jnp.zeros((), jnp.int32)}

  def update_fn(bucket, state, ctx):
    reduced, _ = inner.update(bucket, (), ctx)
    return reduced, {"seen": state["seen"] + bucket.buffer(), "steps": state["steps"] + 1}

  return hooks.CommHook(init_fn, update_fn)


def test_per_replica_state_specs(mesh8, standard_promotion):
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=summing_hook(),
                                          first_bucket_cap_mb=0.001), optax.adam(1e-3))
  g = per_device_grads({"a": jnp.zeros((4, 3)), "b": jnp.zeros(5)}, 8)
  u, state = shard_map_updates(tx, g, mesh8, "data", steps=3)
  # Same synced gradient every step: adam moves by -lr * sign(mean).
  assert_mean(u, jax.tree.map(lambda x: -1e-3 * np.sign(np.mean(x, 0, keepdims=True)), g),
              rtol=1e-4, atol=1e-8)
  sync_state = state[0]
  specs = ddp_jax.state_specs(state, "data")
  assert specs[0].hook_states[0]["seen"] == P("data") and specs[1][0].mu["a"] == P()
  plan = ddp_jax.plan_buckets({"a": jnp.zeros((4, 3)), "b": jnp.zeros(5)},
                              first_bucket_cap_mb=0.001)
  for spec, hs in zip(plan.buckets, jax.tree.map(np.asarray, sync_state.hook_states)):
    assert hs["seen"].shape == (8, spec.size) and hs["steps"].shape == (8,)
    np.testing.assert_array_equal(hs["steps"], 3)
    for d in range(8):  # each replica kept its own sum, not an average
      local = np.concatenate([np.ravel(g[p.split("'")[1]][d]) for p in spec.paths])
      np.testing.assert_allclose(hs["seen"][d], 3 * local, rtol=1e-6)


def test_pmap_per_replica_state():
  tx = ddp_jax.sync_gradients("data", hook=summing_hook())
  g = per_device_grads({"a": jnp.zeros((4, 3))}, 8)
  u, state = pmap_updates(tx, g)
  assert state.hook_states[0]["seen"].shape == (8, 1, 12)
  np.testing.assert_allclose(state.hook_states[0]["seen"][:, 0], g["a"].reshape(8, 12))


def test_no_retrace(mesh8):
  tx = ddp_jax.sync_gradients("data")
  g = ddp_jax.shard(per_device_grads(model_tree(), 8), mesh8, "data")
  state = ddp_jax.init_state(tx, jax.tree.map(lambda x: np.asarray(x)[0], g), mesh8, "data")
  specs = ddp_jax.state_specs(state, "data")

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(s, gs):
    return jax.shard_map(lambda s, gs: tx.update(jax.tree.map(lambda x: x[0], gs), s),
                         mesh=mesh8, in_specs=(specs, P("data")), out_specs=(P(), specs))(s, gs)

  for _ in range(3):
    _, state = step(state, g)


def test_jit_and_chain_compose(mesh8):
  tx = optax.chain(ddp_jax.sync_gradients("data"), optax.clip_by_global_norm(1.0),
                   optax.sgd(0.1))
  g = per_device_grads(model_tree(), 8)
  u, _ = shard_map_updates(tx, g, mesh8, "data")
  want = optax.clip_by_global_norm(1.0).update(
      jax.tree.map(lambda x: x.mean(0), g), optax.EmptyState())[0]
  chex.assert_trees_all_close(jax.tree.map(lambda x: np.asarray(x)[0], u),
                              jax.tree.map(lambda x: -0.1 * x, want), rtol=1e-5, atol=1e-6)


# ---- errors users hit ----------------------------------------------------------------


def test_error_outside_mapped_axis():
  tx = ddp_jax.sync_gradients("data")
  g = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"axis 'data' is not bound.*jax.shard_map.*jax.pmap"):
    tx.update(g, tx.init(g))


def test_error_unknown_axis(mesh8):
  tx = ddp_jax.sync_gradients("batch")
  g = per_device_grads({"w": jnp.ones(3)}, 8)
  with pytest.raises(ValueError, match=r"axis 'batch' is not bound"):
    shard_map_updates(tx, g, mesh8, "data")


def test_error_tree_changed():
  tx = ddp_jax.sync_gradients("i")
  state = tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"first difference at leaf 1: at init \['b'\] "
                                       r"float32\[2\], at update \['c'\] float32\[2\]"):
    jax.vmap(lambda g: tx.update(g, state), axis_name="i")(
        {"a": jnp.ones((2, 3)), "c": jnp.ones((2, 2))})
  with pytest.raises(ValueError, match=r"at init \['b'\] float32\[2\], at update \['b'\] "
                                       r"float32\[3\]"):
    jax.vmap(lambda g: tx.update(g, state), axis_name="i")(
        {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 3))})


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(bucket_cap_mb=0), ValueError, "bucket_cap_mb must be a positive finite"),
    (dict(first_bucket_cap_mb=float("nan")), ValueError, "first_bucket_cap_mb"),
    (dict(bucket_caps_mb=[1, -2]), ValueError, r"bucket_caps_mb\[1\]"),
    (dict(pack="zip"), ValueError, "pack must be one of"),
    (dict(ravel_below_bytes=-1), ValueError, "ravel_below_bytes must be a non-negative int"),
    (dict(order="random"), ValueError, "order must be one of"),
    (dict(hook=lambda b: b), TypeError, "hook must be a CommHook"),
    # A plain (init, update) tuple passed the old check and failed later without a name.
    (dict(hook=(lambda s: (), lambda b, s, c: (b.buffer(), s))), TypeError,
     r"sync_gradients: hook must be a CommHook, got a plain tuple.*CommHook\(init, update\)"),
])
def test_error_bad_config(kwargs, err, match):
  with pytest.raises(err, match=match):
    ddp_jax.sync_gradients("data", **kwargs)


def test_error_bad_axis_name():
  with pytest.raises(TypeError, match="axis_name must be"):
    ddp_jax.sync_gradients(3)


def bad_shape_hook():
  def update_fn(bucket, state, ctx):
    return bucket.buffer()[:-1], state
  return hooks.CommHook(lambda spec: (), update_fn)


def bad_dtype_hook():
  def update_fn(bucket, state, ctx):
    return [x.astype(jnp.float16) for x in bucket.leaves], state
  return hooks.CommHook(lambda spec: (), update_fn)


def state_changing_hook():
  def update_fn(bucket, state, ctx):
    return bucket.leaves, jnp.zeros((2,))
  return hooks.CommHook(lambda spec: jnp.zeros(()), update_fn)


@pytest.mark.parametrize("hook, match", [
    (bad_shape_hook(), r"hook bad_shape_hook on bucket 0 \(\['a'\] ...\) returned an array of "
                       r"float32\[4\]; a flat result must be float32\[5\]"),
    (bad_dtype_hook(), r"hook bad_dtype_hook on bucket 0 .* returned float16\[5\] for leaf "
                       r"\['a'\]; expected float32\[5\]"),
    (state_changing_hook(), r"hook state_changing_hook on bucket 0 returned a state that does "
                            r"not match"),
])
def test_error_bad_hook_output(hook, match):
  tx = ddp_jax.sync_gradients("i", hook=hook)
  g = {"a": jnp.ones((2, 5))}
  with pytest.raises(ValueError, match=match):
    jax.vmap(lambda g: tx.update(g, tx.init(g)), axis_name="i")(g)


def test_error_wrong_state_type():
  tx = ddp_jax.sync_gradients("i")
  with pytest.raises(TypeError, match="state must be the SyncState"):
    tx.update({"a": jnp.ones(2)}, optax.EmptyState())


# ---- per-replica gradients (shard_map's varying types) and the step builder -------------


def _invariant_sync(mesh, tx, g_spec, extra=None):
  """Runs tx.update under shard_map on grads whose in_spec is g_spec (P() = invariant)."""
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  g = per_device_grads(params, 8)
  state = ddp_jax.init_state(tx, params, mesh, "data")
  specs = ddp_jax.state_specs(state, "data")

  def step(s, g, *flag):
    g = jax.tree.map(lambda x: x[0], g) if g_spec != P() else g
    kw = {"participating": flag[0][0]} if flag else {}
    return tx.update(g, s, **kw)[0]

  args = ((ddp_jax.shard(g, mesh, "data") if g_spec != P() else ddp_jax.replicate(params, mesh)),)
  in_specs = (specs, g_spec)
  if extra is not None:
    args, in_specs = args + (ddp_jax.shard(extra, mesh, "data"),), in_specs + (P("data"),)
  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=in_specs, out_specs=P()))
  return fn(state, *args)


def test_invariant_gradients_are_refused_with_the_fix(mesh8):
  with pytest.raises(ValueError, match=r"2 gradient leaves are not per replica over 'data': "
                                       r"\['b'\], \['w'\].*N times the gradient.*"
                                       r"ddp_jax.value_and_grad\(loss_fn, 'data'\).*"
                                       r"invariant_grads='summed'"):
    _invariant_sync(mesh8, ddp_jax.sync_gradients("data"), P())


def test_invariant_gradients_summed_are_divided(mesh8):
  """'summed': an invariant leaf is the sum over the 8 replicas: its mean is it / 8."""
  out = _invariant_sync(mesh8, ddp_jax.sync_gradients("data", invariant_grads="summed"), P())
  np.testing.assert_allclose(out["w"], np.full((4, 3), 1 / 8), rtol=1e-6)


def test_invariant_gradients_summed_refuse_participating(mesh8):
  tx = ddp_jax.sync_gradients("data", invariant_grads="summed")
  with pytest.raises(ValueError, match=r"invariant_grads='summed' cannot honour participating"):
    _invariant_sync(mesh8, tx, P(), extra=np.ones(8, bool))


def test_invariant_grads_bad_mode():
  with pytest.raises(ValueError, match=r"invariant_grads must be one of \('error', 'summed'\)"):
    ddp_jax.sync_gradients("data", invariant_grads="ignore")


def test_partially_invariant_leaf_is_refused_in_summed_mode(mesh2x4):
  """Varying over 'local' but not 'node': no single sum to divide."""
  tx = ddp_jax.sync_gradients(("node", "local"), invariant_grads="summed")
  params = {"w": jnp.ones((4, 3))}
  state = ddp_jax.init_state(tx, params, mesh2x4, ("node", "local"))
  specs = ddp_jax.state_specs(state, ("node", "local"))
  fn = jax.jit(jax.shard_map(lambda s, g: tx.update({"w": g[0]}, s)[0], mesh=mesh2x4,
                             in_specs=(specs, P("local")), out_specs=P()))
  with pytest.raises(ValueError, match=r"leaf \['w'\] varies over some of the axes"):
    fn(state, jax.device_put(np.ones((4, 4, 3), np.float32),
                             jax.NamedSharding(mesh2x4, P("local"))))


def test_value_and_grad_matches_jax_and_checks_its_axis(mesh8):
  loss = lambda w, x: (jnp.sum(w * x) ** 2, x)  # noqa: E731
  f = ddp_jax.value_and_grad(loss, "i", has_aux=True)
  (v, aux), g = jax.vmap(f, axis_name="i")(jnp.ones((2, 3)), jnp.arange(6.0).reshape(2, 3))
  (v2, _), g2 = jax.vmap(jax.value_and_grad(loss, has_aux=True))(
      jnp.ones((2, 3)), jnp.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(g, g2)
  np.testing.assert_array_equal(v, v2)
  g_only, aux_only = jax.vmap(ddp_jax.grad(loss, "i", has_aux=True), axis_name="i")(
      jnp.ones((2, 3)), jnp.arange(6.0).reshape(2, 3))
  np.testing.assert_array_equal(g_only, g2)
  with pytest.raises(ValueError, match=r"ddp_jax.value_and_grad: axis 'data' is not bound"):
    ddp_jax.value_and_grad(lambda w: jnp.sum(w), "data")(jnp.ones(3))
  with pytest.raises(TypeError, match="axis_name must be"):
    ddp_jax.grad(lambda w: w, 0)


def test_data_parallel_errors(mesh8):
  tx = optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(0.1))

  def leaky(p, s, x):  # returns this replica's loss without reducing it
    loss, g = ddp_jax.value_and_grad(lambda p, x: jnp.mean((x @ p) ** 2), "data")(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  p = jnp.ones(3)
  state = ddp_jax.init_state(tx, p, mesh8, "data")
  step = ddp_jax.data_parallel(leaky, mesh8, "data", batch_argnums=2)
  with pytest.raises(ValueError, match=r"output \[2\] of DataParallelStep\(leaky.*differs per "
                                       r"replica.*jax.lax.pmean\(loss, 'data'\)"):
    step(p, state, np.ones((16, 3), np.float32))
  with pytest.raises(ValueError, match=r"argument 2 leaf <root> is batch split over 'data' "
                                       r"\(8 replicas\).*\(12, 3\)"):
    step(p, state, np.ones((12, 3), np.float32))
  with pytest.raises(ValueError, match=r"batch_argnums must name the positions"):
    ddp_jax.data_parallel(leaky, mesh8, "data", batch_argnums=())
  with pytest.raises(ValueError, match=r"axis 'batch' is not an axis of the mesh"):
    ddp_jax.data_parallel(leaky, mesh8, "batch", batch_argnums=2)
  powersgd = optax.chain(ddp_jax.sync_gradients("data", hook=hooks.powersgd(start_iter=0)),
                         optax.sgd(0.1))
  local_state = powersgd.init(jnp.ones((4, 3)))  # tx.init outside the mesh: one replica's
  step = ddp_jax.data_parallel(lambda p, s, x: (p, s), mesh8, "data", batch_argnums=2)
  with pytest.raises(ValueError, match=r"argument 1 leaf \[0\].hook_states\[0\].iter is "
                                       r"per-replica state.*\(1,\).*ddp_jax.init_state"):
    step(jnp.ones((4, 3)), local_state, np.ones((8, 3), np.float32))


def test_flax_is_optional():
  """ddp_jax needs jax, optax and numpy only: without flax it imports and syncs (flax's
  msgpack checkpoints of a SyncState are registered only when flax is installed)."""
  import subprocess
  import sys
  code = (
      "import sys; sys.modules['flax'] = None; sys.modules['chex'] = None\n"
      "import jax, jax.numpy as jnp, ddp_jax\n"
      "tx = ddp_jax.sync_gradients('i')\n"
      "g = {'w': jnp.arange(4.0)}\n"
      "out = jax.vmap(lambda g: tx.update(g, tx.init(g))[0], axis_name='i')(g)\n"
      "assert float(out['w'][0]) == 1.5, out\n"
      "assert 'flax' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
      "print('ok')\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
