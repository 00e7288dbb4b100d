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
from tests.test_hooks import HOOKS, check_close, grads_tree, mesh_of

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
  tol = HOOKS[name][1]
  if tol is not None and not name.startswith("error_feedback"):  # a mean: within tolerance
    check_close(clean[0], g[0], tol)
  # The bad steps: non-finite on every replica, in the bucket that held the value.
  for step in (1, 3):
    for r in range(N):
      assert not np.all(np.isfinite(seen[step]["kernel"][r].astype(np.float32))), (step, r)
  # Otherwise as if they never happened: same results and same state, bit for bit.
  for got, want in zip([seen[2], seen[4]], clean[1:]):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=name), got, want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=name),
               state_seen.hook_states, state_clean.hook_states)


# ---- value ranges and dtypes ---------------------------------------------------------------


def _scaled(stacked, how):
  """Per-replica gradients at a value range, chosen per leaf dtype: 'tiny' entries ~2**10
  times the dtype's smallest normal (their squares underflow), 'huge' ~max / 2**6 / N
  (their squares overflow; their sum does not), 'constant' one value per replica
  (a rank-1 mean)."""
  def one(x):
    info = jnp.finfo(x.dtype)
    x32 = np.asarray(x, np.float32)
    if how == "tiny":
      y = x32 * float(info.tiny) * 2**10
    elif how == "huge":
      y = x32 / np.abs(x32).max() * float(info.max) / 2**6 / x.shape[0]
    elif how == "constant":
      y = np.ones_like(x32) * np.arange(1, x.shape[0] + 1).reshape(-1, *[1] * (x.ndim - 1))
    else:
      y = x32
    return jnp.asarray(y, x.dtype)
  return jax.tree.map(one, stacked)


RANGES = ("normal", "constant", "tiny", "huge")




RANGES = ("normal", "constant", "tiny", "huge")

# Where a hook cannot give the mean, by its design (DDP's too): what it gives instead.
# fp16 on the wire: below f16's smallest value a gradient is lost, above its largest
# the result is not finite; MinMaxObserver's eps (1.2e-7) floors the uint8 scale, so
# gradients far below it quantize to zero.
_LOST, _INF = "lost", "not finite"
FP16_LIMITS = {"tiny": _LOST, "huge": _INF}
RANGE_LIMITS = {
    "fp16_compress": FP16_LIMITS, "fp16_wrapper_allgather": FP16_LIMITS,
    "compress_wrapper_f16_allgather": FP16_LIMITS,
    "fp16_wrapper_powersgd": FP16_LIMITS, "error_feedback_fp16": FP16_LIMITS,
    "by_path": {"tiny": _LOST, "huge": _INF, "exempt": ("bias", "scale")},  # fp16 but these
    "quantize_per_tensor": {"tiny": _LOST}, "quantize_per_channel": {"tiny": _LOST},
}


def _check_range(name, how, got, g, tol):
  limits = RANGE_LIMITS.get(name, {})
  for key in ("kernel", "bias", "scale", "half"):
    limit = None if key in limits.get("exempt", ()) else limits.get(how)
    x = np.asarray(g[key], np.float64)
    out = np.asarray(got[key], np.float64)[0]
    scale = np.abs(x).max()
    if limit == _LOST:
      assert np.abs(out).max() <= 2**-24, (name, how, key)  # nothing above f16's smallest
    elif limit == _INF:
      assert not np.all(np.isfinite(out)), (name, how, key)
    else:
      # The hook's tolerance, the rounding of the result to its dtype, and XLA's flush of
      # subnormals to zero (a few of the dtype's smallest normals, through a few products).
      info = jnp.finfo(g[key].dtype)
      bound = (tol + float(info.eps)) * scale + 16 * float(info.tiny)
      err = np.abs(out - x.mean(0)).max()
      assert err <= bound, (name, how, key, err / scale)


@pytest.mark.parametrize("name", sorted(n for n, (_, tol) in HOOKS.items() if tol is not None))
def test_value_ranges(name):
  """Every averaging hook on every value range (normal, a rank-1 mean, entries near the
  smallest normal, near the largest value), 2 replicas under shard_map, f32/bf16 leaves:
  within its stated tolerance of the exact mean, or the documented limit of its design."""
  factory, tol = HOOKS[name]
  run, state = _shard_map_runner(ddp_jax.sync_gradients("data", hook=factory()), mesh_of(2))
  base = per_device_grads(grads_tree(), 2, seed=7)
  for how in RANGES:
    g = _scaled(base, how)
    out, _ = run(state, g)
    _check_range(name, how, jax.tree.map(np.asarray, out), g, tol)


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_every_dtype_under_pmap(name):
  """f16, bf16, f32 and f64 buckets (x64 on), 8 replicas under pmap: dtypes kept, and
  within the hook's stated tolerance (plus the result's rounding) of the exact mean."""
  factory, tol = HOOKS[name]
  with jax.enable_x64(True):
    tree = {"kernel": jnp.zeros((24, 16)), "bias": jnp.zeros((16,)), "scale": jnp.zeros(()),
            "wide": jnp.zeros((24, 16), jnp.float64), "f16": jnp.zeros((40,), jnp.float16),
            "half": jnp.zeros((40,), jnp.bfloat16)}
    tx = ddp_jax.sync_gradients("data", hook=factory())
    g = per_device_grads(tree, 8, seed=9)
    state = jax.pmap(tx.init)(jax.tree.map(lambda x: jnp.stack([x] * 8), tree))
    out = jax.pmap(lambda x, s: tx.update(x, s)[0], axis_name="data")(g, state)
    for key in tree:
      assert out[key].dtype == tree[key].dtype, (name, key)
      if tol is None:
        continue  # not a mean (top-k, sign, Adasum): tests/test_hooks.py checks those
      x = np.asarray(g[key], np.float64)
      bound = (tol + float(jnp.finfo(tree[key].dtype).eps)) * np.abs(x).max()
      assert np.abs(np.asarray(out[key], np.float64) - x.mean(0)).max() <= bound, (name, key)


def test_nonfinite_fact_waits_for_every_bucket(mesh8):
  """The one-scalar psum that tells stateful hooks whether any replica saw a NaN or Inf
  depends on every bucket's result. Depending on the inputs only, XLA:CPU's runtime
  started it while a bucket's collectives (inside PowerSGD's ``lax.cond`` before
  ``start_iter``) were still to come, in another order on each process: gloo aborted
  4 processes on BERT-base shapes ("Received data size doesn't match expected size")."""
  from jax.sharding import PartitionSpec as P
  params = {f"w{i}": jnp.zeros((64, 48)) for i in range(4)}
  tx = ddp_jax.sync_gradients("data", hook=ddp_jax.hooks.powersgd(rank=2, start_iter=2),
                              bucket_cap_mb=0.01, first_bucket_cap_mb=0.01)
  state = ddp_jax.init_state(tx, params, mesh8, "data")
  specs = ddp_jax.state_specs(state, "data")
  g = ddp_jax.shard(jax.tree.map(lambda x: np.zeros((8, *x.shape), np.float32), params),
                    mesh8, "data")
  fn = jax.shard_map(lambda s, g: tx.update(jax.tree.map(lambda x: x[0], g), s), mesh=mesh8,
                     in_specs=(specs, P("data")), out_specs=(P(), specs))
  (outer,) = jax.make_jaxpr(fn)(state, g).jaxpr.eqns
  eqns = outer.params["jaxpr"].eqns
  conds = [e for e in eqns if e.primitive.name == "cond"]
  facts = [e for e in eqns if e.primitive.name.startswith("psum") and len(e.invars) == 1
           and e.invars[0].aval.shape == () and e.invars[0].aval.dtype == jnp.int32]
  assert len(conds) == 4 and len(facts) == 1, ([e.primitive.name for e in eqns], len(facts))
  made_by = {v: e for e in eqns for v in e.outvars}
  ancestors, todo = set(), list(facts[0].invars)
  while todo:  # every equation the fact's psum input is computed from
    e = made_by.get(todo.pop())
    if e is not None and id(e) not in ancestors:
      ancestors.add(id(e))
      todo += [v for v in e.invars if not hasattr(v, "val")]  # not literals
  assert all(id(c) in ancestors for c in conds)
