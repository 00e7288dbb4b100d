"""DDP training semantics: no_sync accumulation, uneven inputs (Join), start-up broadcast,
buffers, verification, mixed precision, caps lists, stats, unused parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import ddp_jax
from ddp_jax import hooks
from ddp_jax.inspect import collectives
from tests.helpers import assert_mean, per_device_grads, stepper
from tests.multiproc import run_processes


def tree():
  return {"w": jnp.zeros((6, 5)), "b": jnp.zeros((5,)), "h": jnp.zeros((7,), jnp.bfloat16)}


def mapped(tx, mesh, params, extra_in=()):
  return stepper(tx, params, mesh, extra_in=extra_in, pass_params=True)


# ---- no_sync: accumulate ----------------------------------------------------------------


@pytest.mark.parametrize("average", [True, False])
def test_accumulate_equals_sync_of_accumulated(mesh8, average):
  k = 3
  params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((5,))}
  tx = ddp_jax.accumulate(optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(1.0)), k,
                          average=average)
  fn, state = mapped(tx, mesh8, params)
  micro = [per_device_grads(params, 8, seed=s) for s in range(2 * k)]
  outs = []
  for g in micro:
    u, state = fn(state, ddp_jax.shard(g, mesh8, "data"))
    outs.append(jax.tree.map(np.asarray, u))
  for t, u in enumerate(outs):
    if t % k != k - 1:
      assert all(np.all(x == 0) for x in jax.tree.leaves(u)), "no update between syncs"
    else:
      window = micro[t - k + 1:t + 1]
      total = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs), *window)
      want = jax.tree.map(lambda x: -x / (k if average else 1), total)
      assert_mean(u, want, rtol=1e-5, atol=1e-6)


def test_accumulate_communicates_only_in_the_branch(mesh8):
  params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((5,))}
  tx = ddp_jax.accumulate(optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(1.0)), 4)
  fn, state = mapped(tx, mesh8, params)
  g = ddp_jax.shard(per_device_grads(params, 8), mesh8, "data")
  report = collectives(fn, state, g)
  for stage in (report.lowered, report.compiled):
    ar = stage["all-reduce"]
    assert ar.ops >= 1 and ar.in_conditional == ar.ops


def test_plain_sync_is_not_in_a_conditional(mesh8):
  params = {"w": jnp.zeros((6, 5))}
  fn, state = mapped(ddp_jax.sync_gradients("data"), mesh8, params)
  report = collectives(fn, state, ddp_jax.shard(per_device_grads(params, 8), mesh8, "data"))
  assert report.lowered["all-reduce"].in_conditional == 0


def test_multisteps_works(mesh8, standard_promotion):
  """optax.MultiSteps around the chain gives the accumulated, synced update."""
  k = 2
  params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((5,))}
  tx = optax.MultiSteps(optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(1.0)), k)
  fn, state = mapped(tx, mesh8, params)
  specs = ddp_jax.state_specs(state, "data")
  assert specs.acc_grads["w"] == P("data")
  g1, g2 = per_device_grads(params, 8, seed=1), per_device_grads(params, 8, seed=2)
  u1, state = fn(state, ddp_jax.shard(g1, mesh8, "data"))
  u2, state = fn(state, ddp_jax.shard(g2, mesh8, "data"))
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u1))
  want = jax.tree.map(lambda a, b: -(np.asarray(a) + np.asarray(b)) / 2, g1, g2)
  assert_mean(u2, want, rtol=1e-5, atol=1e-6)


def test_multisteps_scalar_leaf_error():
  tx = optax.MultiSteps(optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(1.0)), 2)
  with pytest.raises(ValueError, match=r"MultiStepsState.acc_grads\['s'\] is a per-replica "
                                       r"scalar.*ddp_jax.accumulate"):
    ddp_jax.state_specs(tx.init({"s": jnp.zeros(())}), "data")


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_accumulate_bad_k(k):
  with pytest.raises(ValueError, match="k must be an int >= 1"):
    ddp_jax.accumulate(optax.sgd(1.0), k)


# ---- uneven inputs: participating ---------------------------------------------------------


def fp16_ef_hook():
  """A stateful test hook: fp16 all-reduce with an error-feedback residual that a
  non-participating replica must leave alone."""
  def init_fn(spec):
    return {"residual": jnp.zeros((spec.size,), spec.dtype)}

  def update_fn(bucket, state, ctx):
    corrected = bucket.buffer() + state["residual"]
    half = corrected.astype(jnp.float16)
    residual = corrected - half.astype(corrected.dtype)
    if ctx.participating is not None:
      residual = jnp.where(ctx.participating, residual, state["residual"])
    summed = lax.psum(half.astype(jnp.float32), ctx.axis_name)
    return (summed / ctx.divisor.astype(jnp.float32) if ctx.num_participating is not None
            else summed / ctx.axis_size).astype(bucket.dtype), {"residual": residual}

  return hooks.CommHook(init_fn, update_fn)


@pytest.mark.parametrize("hook", [None, "ef"])
def test_uneven_inputs(mesh8, hook):
  """Replica r has r + 1 batches; steps past a replica's data pass participating=False."""
  params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((5,))}
  h = fp16_ef_hook() if hook == "ef" else None
  fn, state = mapped(ddp_jax.sync_gradients("data", hook=h), mesh8, params,
                     extra_in=("participating",))
  for t in range(8):
    g = per_device_grads(params, 8, seed=t)
    flags = np.arange(8) >= t  # replica r still has data at step t iff t <= r
    before = jax.tree.map(np.asarray, state.hook_states)
    u, state = fn(state, ddp_jax.shard(g, mesh8, "data"), ddp_jax.shard(flags, mesh8, "data"))
    want = jax.tree.map(lambda x, f=flags: np.asarray(x)[f], g)
    # f16 spacing near 2 is 2**-9; error feedback moves one step's rounding to the next.
    tol = 4e-3 if hook else 1e-6
    assert_mean(u, want, rtol=0, atol=tol)
    assert int(state.stats.participating) == flags.sum()
    if hook:
      after = jax.tree.map(np.asarray, state.hook_states)
      for b, a in zip(before, after):
        for r in np.nonzero(~flags)[0]:  # idle replicas kept their residual
          np.testing.assert_array_equal(a["residual"][r], b["residual"][r])


def test_participating_weights(mesh8):
  """An integer weight w_r: the result is sum(g_r) / sum(w_r); weight 0 is idle."""
  params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((5,))}
  fn, state = mapped(ddp_jax.sync_gradients("data"), mesh8, params, extra_in=("participating",))
  g = per_device_grads(params, 8, seed=1)
  weights = np.array([3, 1, 0, 2, 1, 0, 4, 1], np.int32)
  u, state = fn(state, ddp_jax.shard(g, mesh8, "data"), ddp_jax.shard(weights, mesh8, "data"))
  for name in params:
    x = np.asarray(g[name], np.float64)
    want = x[weights > 0].sum(0) / weights.sum()
    for row in np.asarray(u[name]):
      np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)
  assert int(state.stats.participating) == 6


@pytest.mark.parametrize("average", [True, False])
def test_accumulate_honours_participating_on_every_micro_step(mesh8, average):
  """Replicas idle on a micro-step add nothing for it; the update is the mean over the
  (replica, micro-step) pairs that took part (k x that for sums): one device's training
  on the data that exists."""
  k = 3
  params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((5,))}
  tx = ddp_jax.accumulate(optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(1.0)), k,
                          average=average)
  fn, state = mapped(tx, mesh8, params, extra_in=("participating",))
  micro = [per_device_grads(params, 8, seed=s) for s in range(k)]
  flags = np.ones((k, 8), bool)
  flags[0, :4] = False  # replicas 0-3 idle on micro-step 0
  flags[2, 6] = False   # replica 6 idle on the last one
  flags[:, 7] = False   # replica 7 idle throughout
  for t in range(k):
    u, state = fn(state, ddp_jax.shard(micro[t], mesh8, "data"),
                  ddp_jax.shard(flags[t], mesh8, "data"))
    if t < k - 1:
      assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
  for name in params:
    taken = sum(np.asarray(micro[t][name], np.float64)[flags[t]].sum(0) for t in range(k))
    want = -taken / flags.sum() * (1 if average else k)
    for row in np.asarray(u[name]):
      np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)
  assert int(state.inner[0].stats.participating) == 7  # replicas with any data
  # The local sums and counts were reset for the next window.
  assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(state.acc))
  assert np.all(np.asarray(state.weight) == 0)


@pytest.mark.parametrize("mapping", ["shard_map", "pmap"])
def test_apply_if_finite_after_the_sync_skips_on_every_replica(mesh8, mapping):
  """A NaN in one element on one replica: the averaged gradients are NaN on every replica,
  so every replica skips the step alike (no replica runs a collective alone); the next,
  finite step applies."""
  params = {"w": jnp.ones((4, 3))}
  tx = optax.chain(ddp_jax.sync_gradients("data"), optax.apply_if_finite(optax.sgd(1.0), 3))

  def step(p, s, g):
    u, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
    return optax.apply_updates(p, u), s

  if mapping == "pmap":
    stack = lambda t: jax.tree.map(lambda a: jnp.stack([a] * 8), t)  # noqa: E731
    p, s = stack(params), jax.pmap(tx.init)(stack(params))
    fn = jax.pmap(lambda p, s, g: step(p, s, jax.tree.map(lambda x: x[None], g)),
                  axis_name="data")
    place = lambda g: g  # noqa: E731
  else:
    s = ddp_jax.init_state(tx, params, mesh8, "data")
    specs = ddp_jax.state_specs(s, "data")
    p = ddp_jax.replicate(params, mesh8)
    fn = jax.jit(jax.shard_map(step, mesh=mesh8, in_specs=(P(), specs, P("data")),
                               out_specs=(P(), specs)))
    place = lambda g: ddp_jax.shard(g, mesh8, "data")  # noqa: E731
  bad = per_device_grads(params, 8, seed=1)
  bad["w"] = bad["w"].at[3, 2, 1].set(jnp.nan)
  p, s = fn(p, s, place(bad))
  w = np.asarray(p["w"]).reshape(-1, 4, 3)
  assert np.all(w == 1.0), "every replica skipped the non-finite step"
  assert np.all(np.asarray(s[1].notfinite_count) == 1)
  good = per_device_grads(params, 8, seed=2)
  p, s = fn(p, s, place(good))
  want = 1.0 - np.asarray(good["w"], np.float64).mean(0)
  for row in np.asarray(p["w"]).reshape(-1, 4, 3):
    np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)


def test_apply_if_finite_around_the_sync_is_refused(mesh8):
  params = {"w": jnp.ones((4, 3))}
  tx = optax.apply_if_finite(optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(1.0)), 3)
  with pytest.raises(ValueError, match=r"apply_if_finite wraps ddp_jax.sync_gradients.*"
                                       r"optax.chain\(ddp_jax.sync_gradients"):
    ddp_jax.init_state(tx, params, mesh8, "data")


def test_participating_must_be_scalar():
  tx = ddp_jax.sync_gradients("i")
  g = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=r"participating must be this replica's scalar flag.*"
                                       r"got bool\[3\]"):
    jax.vmap(lambda g: tx.update(g, tx.init(g), participating=jnp.ones(3, bool)),
             axis_name="i")(g)
  with pytest.raises(ValueError, match=r"got float32\[\]"):
    jax.vmap(lambda g: tx.update(g, tx.init(g), participating=jnp.float32(1)),
             axis_name="i")(g)


# ---- start-up broadcast, buffers, verification -------------------------------------------


def test_broadcast_params_and_buffers(mesh8):
  stacked = {"w": jnp.arange(8.0)[:, None] * jnp.ones((8, 3)),
             "n": jnp.arange(8, dtype=jnp.int32), "flag": jnp.arange(8) % 2 == 1}

  def step(t):
    t = jax.tree.map(lambda x: x[0], t)
    return (ddp_jax.broadcast_params(t, "data"),
            ddp_jax.broadcast_params(t, "data", source=3),
            ddp_jax.sync_buffers({"mean": t["w"]}, "data", how="mean"))

  fn = jax.jit(jax.shard_map(step, mesh=mesh8, in_specs=P("data"), out_specs=P()))
  b0, b3, buf = fn(ddp_jax.shard(stacked, mesh8, "data"))
  np.testing.assert_array_equal(b0["w"], np.zeros(3))
  np.testing.assert_array_equal(b3["w"], np.full(3, 3.0))
  assert int(b3["n"]) == 3 and bool(b3["flag"]) and b3["flag"].dtype == jnp.bool_
  np.testing.assert_allclose(buf["mean"], np.full(3, 3.5))
  with pytest.raises(ValueError, match="how must be one of"):
    ddp_jax.sync_buffers({}, "data", how="max")


def test_verify_replicas_single_process(mesh8):
  ddp_jax.verify_replicas(ddp_jax.replicate({"w": jnp.ones(3)}, mesh8), check_values=True)
  sharding = jax.sharding.NamedSharding(mesh8, P())
  parts = [jax.device_put(np.full(3, 1.0 if i != 5 else 2.0, np.float32), d)
           for i, d in enumerate(mesh8.devices.flat)]
  bad = jax.make_array_from_single_device_arrays((3,), sharding, parts)
  with pytest.raises(ValueError, match=r"leaf \['w'\] is replicated but device .*5.* holds "
                                       r"different values"):
    ddp_jax.verify_replicas({"w": bad}, check_values=True)


@pytest.mark.multiprocess
def test_broadcast_and_verify_two_processes():
  results, codes, outputs = run_processes("""
  tree = {"w": jnp.full(3, float(rank) + 1), "n": jnp.asarray(rank, jnp.int32)}
  same = ddp_jax.broadcast_from_process0(tree)
  result([np.asarray(same["w"]).tolist(), int(same["n"])])
  ddp_jax.verify_replicas(same, check_values=True)
  extra = {"extra": jnp.ones(1)} if rank else {}
  for bad in ({"w": jnp.ones(3 + rank)}, {"w": jnp.ones(3), **extra},
              {"w": jnp.full(3, float(rank))}, {"a" if rank else "b": jnp.ones(2)}):
    try:
      ddp_jax.verify_replicas(bad, check_values=True)
      result("no error")
    except ValueError as e:
      result(str(e))
  """)
  assert codes == [0, 0], outputs
  for rank, res in enumerate(results):
    assert res[0] == [[1.0, 1.0, 1.0], 0]
    assert res[1].startswith(f"verify_replicas: leaf 0 ['w'] (float32[{3 + rank}] on process "
                             f"{rank}) differs in path, shape or dtype on process {1 - rank}")
    assert res[2].startswith(f"verify_replicas: process {1 - rank} has {2 - rank} leaves, "
                             f"process {rank} has {1 + rank}")
    assert res[3] == (f"verify_replicas: leaf ['w'] has different values on process "
                      f"{1 - rank} than on process {rank}.")
    name = "['a']" if rank else "['b']"
    assert res[4].startswith(f"verify_replicas: leaf 0 {name} (float32[2] on process {rank}) "
                             f"differs in path")


# ---- mixed precision ---------------------------------------------------------------------


def test_reduce_dtype_f32_for_bf16(mesh8):
  params = {"h": jnp.zeros((64,), jnp.bfloat16), "w": jnp.zeros((3,))}
  tx = ddp_jax.sync_gradients("data", reduce_dtype=jnp.float32)
  fn, state = mapped(tx, mesh8, params)
  g = per_device_grads(params, 8, seed=3)
  u, _ = fn(state, ddp_jax.shard(g, mesh8, "data"))
  assert u["h"].dtype == jnp.bfloat16
  exact = np.mean(np.asarray(g["h"], np.float32), axis=0)
  want = np.asarray(jnp.asarray(exact).astype(jnp.bfloat16))
  for row in np.asarray(u["h"]):
    np.testing.assert_array_equal(row, want)  # one rounding, at the end
  plan = ddp_jax.plan_buckets(jax.tree.map(lambda x: x.astype(jnp.float32), params))
  assert state.stats.buckets == plan.num_buckets == 1
  with pytest.raises(ValueError, match="reduce_dtype must be a floating dtype"):
    ddp_jax.sync_gradients("data", reduce_dtype=jnp.int8)


def test_predivide_avoids_f16_overflow(mesh8):
  params = {"h": jnp.zeros((4,), jnp.float16)}
  g = {"h": jnp.full((8, 4), 30000.0, jnp.float16)}  # 8 x 30000 overflows f16 (max 65504)
  results = {}
  for name, kw in [("after", dict(hook=hooks.allreduce(divide="after"))),
                   ("predivide", dict(hook=hooks.allreduce(divide="after"),
                                      gradient_predivide_factor=8.0)),
                   ("default", {})]:
    fn, state = mapped(ddp_jax.sync_gradients("data", **kw), mesh8, params)
    results[name] = np.asarray(fn(state, ddp_jax.shard(g, mesh8, "data"))[0]["h"])
  assert np.all(np.isinf(results["after"]))
  # Finite, and within f16's rounding of partial sums (spacing 16 above 16384).
  np.testing.assert_allclose(results["predivide"].astype(np.float32), 30000.0, atol=32)
  np.testing.assert_allclose(results["default"].astype(np.float32), 30000.0, atol=32)
  with pytest.raises(ValueError, match="gradient_predivide_factor must be a positive finite"):
    ddp_jax.sync_gradients("data", gradient_predivide_factor=0)


# ---- caps list, stats, describe, debug log ---------------------------------------------


def test_bucket_caps_list_on_sync(mesh8):
  params = {f"p{i}": jnp.zeros((1024,)) for i in range(10)}  # 4 KiB each
  kib = 1 / 1024
  tx = ddp_jax.sync_gradients("data", bucket_caps_mb=[4 * kib, 8 * kib, 12 * kib],
                              order="forward")
  fn, state = mapped(tx, mesh8, params)
  g = ddp_jax.shard(per_device_grads(params, 8), mesh8, "data")
  report = collectives(fn, state, g)
  assert report.lowered["all-reduce"].calls == 5
  u, state = fn(state, g)
  assert int(state.stats.buckets) == 5


def test_stats(mesh8):
  params = tree()
  fn, state = mapped(ddp_jax.sync_gradients("data"), mesh8, params)
  assert int(state.stats.steps) == 0
  g = ddp_jax.shard(per_device_grads(params, 8), mesh8, "data")
  for _ in range(3):
    _, state = fn(state, g)
  s = state.stats
  plan = ddp_jax.plan_buckets(params)
  assert (int(s.steps), int(s.participating), int(s.buckets), int(s.collectives)) == (
      3, 8, plan.num_buckets, plan.num_buckets)
  assert float(s.bytes_sent) == float(s.bytes_uncompressed) == 2 * 7 / 8 * plan.nbytes
  assert float(s.compression_ratio) == 1.0
  assert ddp_jax.state_specs(state, "data").stats.steps == P()


def test_describe_and_debug_log(mesh8, capsys, monkeypatch):
  text = ddp_jax.describe(ddp_jax.sync_gradients("data", hook=hooks.noop()), tree())
  assert "hook noop" in text and "0 B sent in 0 collective calls" in text
  assert "as many bytes as all-reducing" in ddp_jax.describe(ddp_jax.sync_gradients("data"),
                                                             tree())
  two = ddp_jax.describe(ddp_jax.plan_buckets({"w": jnp.zeros((1024,))}),
                         hook=hooks.allgather_then_aggregate(), world_size=8)
  assert "4.0x the bytes of all-reducing" in two  # (N-1) B against 2 (N-1)/N B
  assert "bucket" in ddp_jax.describe(ddp_jax.plan_buckets(tree()))
  with pytest.raises(TypeError, match="pass a BucketPlan or the transformation"):
    ddp_jax.describe(optax.chain(ddp_jax.sync_gradients("data")), tree())
  capsys.readouterr()
  monkeypatch.setenv("DDP_JAX_DEBUG", "1")
  params = {"dbg": jnp.zeros((11, 3))}
  fn, state = mapped(ddp_jax.sync_gradients("data"), mesh8, params)
  g = ddp_jax.shard(per_device_grads(params, 8), mesh8, "data")
  fn(state, g)
  fn(state, g)
  err = capsys.readouterr().err
  assert err.count("[ddp_jax] sync over 'data' (8 replicas)") == 1 and "['dbg']" in err


# ---- unused and frozen parameters --------------------------------------------------------


@pytest.mark.parametrize("how", ["ddp_jax.grad", "summed"])
def test_unused_and_absent_gradients(mesh8, how):
  """No find_unused_parameters: an unused branch just has zero (or None) gradients, and
  the used leaves get exactly the full-batch update (SGD: scale-sensitive)."""
  params = {"used": jnp.ones((4, 3)), "unused": jnp.ones((5,))}

  def loss(p, x):
    return jnp.mean((x @ p["used"]) ** 2)

  tx = optax.chain(ddp_jax.sync_gradients(
      "data", invariant_grads="summed" if how == "summed" else "error"), optax.sgd(0.1))
  state = ddp_jax.init_state(tx, params, mesh8, "data")
  specs = ddp_jax.state_specs(state, "data")

  def step(p, s, x):
    # "summed": plain jax.grad, whose gradients autodiff already summed over the axis.
    g = jax.grad(loss)(p, x) if how == "summed" else ddp_jax.grad(loss, "data")(p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  fn = jax.jit(jax.shard_map(step, mesh=mesh8, in_specs=(P(), specs, P("data")),
                             out_specs=(P(), specs)))
  x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
  new, _ = fn(ddp_jax.replicate(params, mesh8), state, ddp_jax.shard(x, mesh8, "data"))
  np.testing.assert_array_equal(new["unused"], params["unused"])
  want = params["used"] - 0.1 * jax.grad(loss)(params, x)["used"]
  np.testing.assert_allclose(new["used"], want, rtol=1e-6, atol=1e-6)
  # Absent gradients (None) pass through.
  tx2 = ddp_jax.sync_gradients("i")
  out = jax.vmap(lambda g: tx2.update(g, tx2.init(g))[0], axis_name="i")(
      {"a": jnp.ones((2, 3)), "b": None})
  assert out["b"] is None


def test_frozen_leaves_masked_out_are_not_sent(mesh8):
  params = {"backbone": jnp.zeros((256, 64)), "head": jnp.zeros((64, 10))}
  mask = {"backbone": False, "head": True}
  full = optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(0.1))
  frozen = optax.masked(optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(0.1)), mask)
  g = ddp_jax.shard(per_device_grads(params, 8), mesh8, "data")
  sent = {}
  for name, tx in [("full", full), ("frozen", frozen)]:
    fn, state = mapped(tx, mesh8, params)
    sent[name] = collectives(fn, state, g).lowered["all-reduce"].bytes
    u, _ = fn(state, g)
  assert sent["full"] == (256 * 64 + 64 * 10) * 4
  assert sent["frozen"] == 64 * 10 * 4
  np.testing.assert_array_equal(np.asarray(u["backbone"])[0], np.asarray(g["backbone"])[0])
