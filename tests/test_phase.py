"""Warm-up programs (``ddp_jax._phase``): ``data_parallel`` runs a step compiled without
PowerSGD's compression until ``start_iter`` could be reached, then the full program, with
the same numbers as the full program all along."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ddp_jax
from ddp_jax import _phase

N = 8


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((N,), ("data",))


def params0():
  rng = np.random.default_rng(0)
  return {"a": rng.standard_normal((16, 12)).astype(np.float32),
          "b": rng.standard_normal((12, 6)).astype(np.float32),
          "c": rng.standard_normal((6, 4)).astype(np.float32)}


def batch(t):
  rng = np.random.default_rng(100 + t)
  return (rng.standard_normal((4 * N, 16)).astype(np.float32),
          rng.standard_normal((4 * N, 4)).astype(np.float32))


def loss_fn(w, x, y):
  return jnp.mean((jnp.tanh(x @ w["a"]) @ w["b"] @ w["c"] - y) ** 2)


def make_tx(hook, **kwargs):
  return optax.chain(ddp_jax.sync_gradients("data", hook=hook, **kwargs), optax.sgd(0.1))


def plain_step(tx):
  def step(w, s, x, y):
    g = ddp_jax.grad(loss_fn, "data")(w, x, y)
    u, s = tx.update(g, s, w)
    return optax.apply_updates(w, u), s
  return step


def train(monkeypatch, mesh, tx, step_fn, setting, calls=6, states=None, donate=()):
  """Runs ``calls`` steps; returns the parameters after each and the programs built.
  ``states``: {call: state} given instead of the previous call's (a restore)."""
  monkeypatch.setenv("DDP_JAX_WARMUP_PROGRAM", setting)
  step = ddp_jax.data_parallel(step_fn, mesh, "data", batch_argnums=(2, 3),
                               donate_argnums=donate)
  w = ddp_jax.broadcast_from_process0(params0(), mesh)
  s = ddp_jax.init_state(tx, w, mesh, "data")
  seen, programs = [], []
  for t in range(calls):
    if states and t in states:
      s = states[t]
    w, s = step(w, s, *batch(t))
    seen.append(jax.tree.map(np.asarray, w))
    programs.append(step.last_program)
  return seen, programs, step


def assert_same(a, b):
  for t, (x, y) in enumerate(zip(a, b)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=f"call {t}, leaf {k}")


@pytest.mark.parametrize("hook", [
    ddp_jax.hooks.powersgd(rank=1, start_iter=3, min_compression_rate=1),
    ddp_jax.hooks.batched_powersgd(rank=1, start_iter=3)], ids=["powersgd", "batched"])
def test_warmup_program_until_start_iter_then_the_full_one(monkeypatch, mesh, hook):
  # Several buckets: a call moves each bucket's iteration by one, so the warm-up program
  # runs for exactly start_iter calls.
  tx = make_tx(hook, first_bucket_cap_mb=1e-4, bucket_cap_mb=1e-4)
  warm, programs, step = train(monkeypatch, mesh, tx, plain_step(tx), "1")
  assert len(ddp_jax.init_state(tx, params0(), mesh, "data")[0].hook_states) >= 2
  assert programs == ["warm-up"] * 3 + ["full"] * 3
  full, programs_off, _ = train(monkeypatch, mesh, tx, plain_step(tx), "0")
  assert programs_off == ["full"] * 6
  assert_same(warm, full)
  # compression changed the parameters from the 4th call on (the test can see a switch)
  allreduce_tx = make_tx(ddp_jax.hooks.allreduce())
  plain, _, _ = train(monkeypatch, mesh, allreduce_tx, plain_step(allreduce_tx), "1")
  assert_same(warm[:3], plain[:3])
  assert np.abs(warm[3]["a"] - plain[3]["a"]).max() > 1e-6


def test_donated_params_and_state_through_the_switch(monkeypatch, mesh):
  """``donate_argnums=(0, 1)`` (params and optimizer state, as with ``jax.jit``): the
  warm-up program, the switch (which reads the hook states' iteration) and the full
  program run on donated buffers, the numbers those of the run without donation, and the
  parameters and hook states passed in are consumed."""
  tx = make_tx(ddp_jax.hooks.powersgd(rank=1, start_iter=3, min_compression_rate=1),
               first_bucket_cap_mb=1e-4, bucket_cap_mb=1e-4)
  kept, _, _ = train(monkeypatch, mesh, tx, plain_step(tx), "1")
  donated, programs, step = train(monkeypatch, mesh, tx, plain_step(tx), "1", donate=(0, 1))
  assert programs == ["warm-up"] * 3 + ["full"] * 3
  assert_same(donated, kept)
  w = ddp_jax.broadcast_from_process0(params0(), mesh)
  s = ddp_jax.init_state(tx, w, mesh, "data")
  step(w, s, *batch(0))
  assert all(x.is_deleted() for x in jax.tree.leaves((w, s[0].hook_states)))


def test_warmup_program_holds_no_compression(mesh):
  tx = make_tx(ddp_jax.hooks.powersgd(rank=1, start_iter=3, min_compression_rate=1))
  step = ddp_jax.data_parallel(plain_step(tx), mesh, "data", batch_argnums=(2, 3))
  w = ddp_jax.broadcast_from_process0(params0(), mesh)
  s = ddp_jax.init_state(tx, w, mesh, "data")
  warm = step.lower(w, s, *batch(0), warm_up=True).as_text()
  full = step.lower(w, s, *batch(0)).as_text()
  # the full program: the cond and the Gram-Schmidt loops; the warm-up one: neither
  assert "while" in full and ("conditional" in full or "case" in full)
  assert "while" not in warm and "conditional" not in warm and "case(" not in warm
  assert "all_reduce" in warm or "all-reduce" in warm


def test_two_updates_per_call_switch_two_calls_early(monkeypatch, mesh):
  tx = make_tx(ddp_jax.hooks.powersgd(rank=1, start_iter=3, min_compression_rate=1))

  def twice(w, s, x, y):
    for half in (slice(0, 2), slice(2, 4)):
      g = ddp_jax.grad(loss_fn, "data")(w, x[half], y[half])
      u, s = tx.update(g, s, w)
      w = optax.apply_updates(w, u)
    return w, s

  warm, programs, _ = train(monkeypatch, mesh, tx, twice, "1", calls=4)
  # iterations 0-1 in call 1; call 2 would run iterations 2 and 3 (compressed)
  assert programs == ["warm-up"] + ["full"] * 3
  full, _, _ = train(monkeypatch, mesh, tx, twice, "0", calls=4)
  assert_same(warm, full)


def test_update_in_a_loop_gets_the_full_program(monkeypatch, mesh):
  tx = make_tx(ddp_jax.hooks.powersgd(rank=1, start_iter=3, min_compression_rate=1))

  def scanned(w, s, x, y):  # two updates per call inside lax.scan: no bound per call
    def body(carry, xy):
      w, s = carry
      g = ddp_jax.grad(loss_fn, "data")(w, *xy)
      u, s = tx.update(g, s, w)
      return (optax.apply_updates(w, u), s), None
    (w, s), _ = jax.lax.scan(body, (w, s), (x.reshape(2, 2, -1), y.reshape(2, 2, -1)))
    return w, s

  warm, programs, _ = train(monkeypatch, mesh, tx, scanned, "1", calls=3)
  assert programs == ["full"] * 3  # found the loop: the full program only
  full, _, _ = train(monkeypatch, mesh, tx, scanned, "0", calls=3)
  assert_same(warm, full)


def test_a_state_from_elsewhere_is_read_before_use(monkeypatch, mesh):
  tx = make_tx(ddp_jax.hooks.powersgd(rank=1, start_iter=3, min_compression_rate=1))
  _, _, other = train(monkeypatch, mesh, tx, plain_step(tx), "0", calls=0)
  w = ddp_jax.broadcast_from_process0(params0(), mesh)
  restored = ddp_jax.init_state(tx, w, mesh, "data")
  for t in range(3):  # a state at iteration 3: its next update compresses
    w, restored = other(w, restored, *batch(t))
  warm, programs, _ = train(monkeypatch, mesh, tx, plain_step(tx), "1", calls=3,
                            states={1: restored})
  assert programs == ["warm-up", "full", "full"]
  full, _, _ = train(monkeypatch, mesh, tx, plain_step(tx), "0", calls=3, states={1: restored})
  assert_same(warm, full)


def test_until_is_a_cond_outside_warmup_traces():
  f = jax.jit(lambda i: _phase.until(i, 2, lambda x: x + 1, lambda x: x - 1, 10))
  assert [int(f(i)) for i in range(4)] == [11, 11, 9, 9]


def test_update_in_a_user_jit_is_not_answered_from_the_warmup_trace(monkeypatch, mesh):
  # jax.jit caches traces by function and argument structure; the warm-up mark is part
  # of the SyncState's structure, so the full program traces the compression anew.
  tx = make_tx(ddp_jax.hooks.powersgd(rank=1, start_iter=2, min_compression_rate=1))
  update = jax.jit(tx.update)

  def step(w, s, x, y):
    u, s = update(ddp_jax.grad(loss_fn, "data")(w, x, y), s, w)
    return optax.apply_updates(w, u), s

  warm, programs, _ = train(monkeypatch, mesh, tx, step, "1", calls=4)
  assert programs == ["warm-up"] * 2 + ["full"] * 2
  full, _, _ = train(monkeypatch, mesh, tx, step, "0", calls=4)
  assert_same(warm, full)


def test_accumulated_steps_switch_by_their_syncs(monkeypatch, mesh):
  # no_sync-style accumulation: the sync runs on every 2nd call (inside a cond), so the
  # hook's iteration moves slower than the calls. The step traces the sync twice (the
  # skip branch reads the update's shapes from a trace), so a call counts as two
  # iterations: the switch comes early (call 3 instead of 5), never late.
  hook = ddp_jax.hooks.powersgd(rank=1, start_iter=2, min_compression_rate=1)
  tx = ddp_jax.accumulate(make_tx(hook), 2)
  warm, programs, _ = train(monkeypatch, mesh, tx, plain_step(tx), "1", calls=7)
  assert programs == ["warm-up"] * 2 + ["full"] * 5
  full, _, _ = train(monkeypatch, mesh, tx, plain_step(tx), "0", calls=7)
  assert_same(warm, full)


def test_large_leaves_in_warmup_match_the_full_program(monkeypatch, mesh):
  # A bucket of a large and a small leaf (raveled by padding the large one, see
  # _pack.ravel), with the warm-up program lowered before the first call: the numbers
  # stay those of the full program, and the switch still comes.
  tx = make_tx(ddp_jax.hooks.powersgd(rank=1, start_iter=2, min_compression_rate=1),
               pack="variadic")
  big = {"u": np.full((2200, 1024), 1e-3, np.float32), "v": np.full((1024, 4), 1e-3, np.float32)}

  def loss(w, x, y):
    return jnp.mean((x[:, :1] * jnp.sum(w["u"], 0)[None, :4] @ w["v"][:4] - y) ** 2)

  def step(w, s, x, y):
    u, s = tx.update(ddp_jax.grad(loss, "data")(w, x, y), s, w)
    return optax.apply_updates(w, u), s

  runs = {}
  for setting in ("1", "0"):
    monkeypatch.setenv("DDP_JAX_WARMUP_PROGRAM", setting)
    fn = ddp_jax.data_parallel(step, mesh, "data", batch_argnums=(2, 3))
    w = ddp_jax.broadcast_from_process0(big, mesh)
    s = ddp_jax.init_state(tx, w, mesh, "data")
    if setting == "1":  # lowered before the first call (its outputs came back marked once)
      hlo = fn.lower(w, s, *batch(0), warm_up=True).as_text()
      assert "stablehlo.case" not in hlo and "stablehlo.dynamic_update_slice" in hlo
    seen = []
    for t in range(4):
      w, s = fn(w, s, *batch(t))
      seen.append((fn.last_program, jax.tree.map(np.asarray, w)))
    runs[setting] = seen
  assert [p for p, _ in runs["1"]] == ["warm-up"] * 2 + ["full"] * 2
  assert_same([w for _, w in runs["1"]], [w for _, w in runs["0"]])


def test_nonfinite_warmup_step_does_not_count(monkeypatch, mesh):
  # A NaN gradient on one replica during warm-up: the hook state stays as it was (its
  # iteration too), so the switch comes one call later, as in the full program.
  tx = optax.chain(
      ddp_jax.sync_gradients("data", hook=ddp_jax.hooks.powersgd(
          rank=1, start_iter=2, min_compression_rate=1)),
      optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5))

  def step(w, s, x, y):
    u, s = tx.update(ddp_jax.grad(loss_fn, "data")(w, x, y), s, w)
    return optax.apply_updates(w, u), s

  def run(setting):
    monkeypatch.setenv("DDP_JAX_WARMUP_PROGRAM", setting)
    fn = ddp_jax.data_parallel(step, mesh, "data", batch_argnums=(2, 3))
    w = ddp_jax.broadcast_from_process0(params0(), mesh)
    s = ddp_jax.init_state(tx, w, mesh, "data")
    seen, programs, iters = [], [], []
    for t in range(5):
      x, y = batch(t)
      if t == 1:
        x[0, 0] = np.nan  # replica 0's rows only
      w, s = fn(w, s, x, y)
      seen.append(jax.tree.map(np.asarray, w))
      programs.append(fn.last_program)
      iters.append(_phase.largest(_phase.iterations(s)))
    return seen, programs, iters

  warm, programs, iters = run("1")
  assert iters == [1, 1, 2, 3, 4]  # the NaN call did not count
  assert programs == ["warm-up"] * 3 + ["full"] * 2
  full, _, iters_full = run("0")
  assert iters_full == iters
  assert_same(warm, full)
  assert all(np.isfinite(w["a"]).all() for w in warm)
