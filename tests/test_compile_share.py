"""One compile for all processes (``ddp_jax._compile``): process 0 compiles the
``data_parallel`` step and the others load its executable; a restart with the
persistent cache compiles nothing; a process whose program differs compiles its own."""

import pytest

from tests.multiproc import run_processes

STEP = """
import time, optax
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, fun_name="", **kw: compiles.append(duration)
    if event == "/jax/core/compile/backend_compile_duration" and "traced" in fun_name
    else None)  # the data_parallel step's program (jit(traced)), compiled or from a cache
mesh = jax.make_mesh((jax.device_count(),), ("data",))
tx = optax.chain(ddp_jax.sync_gradients("data", hook=ddp_jax.hooks.powersgd(rank=1)),
                 optax.sgd(0.1))
def loss_fn(w, x):
  return jnp.mean(jnp.tanh(jnp.minimum(x, CAP) @ w["a"]) @ w["b"])
def step(w, s, x):
  g = ddp_jax.grad(loss_fn, "data")(w, x)
  u, s = tx.update(g, s, w)
  return optax.apply_updates(w, u), s
w = {"a": np.full((8, 6), 0.1, np.float32), "b": np.full((6, 3), 0.2, np.float32)}
x = np.random.default_rng(0).standard_normal((4 * jax.device_count(), 8)).astype(np.float32)
s = ddp_jax.init_state(tx, w, mesh, "data")
train = ddp_jax.data_parallel(step, mesh, "data", batch_argnums=2)
before = len(compiles)
for _ in range(3):
  w, s = train(w, s, x)
result({"compiles": len(compiles) - before,
        "w": np.asarray(w["a"]).tolist() + np.asarray(w["b"]).tolist()})
"""


def _run(tmp_path, cap="1000.0", share="1"):
  code = (f"import os\nos.environ['DDP_JAX_SHARE_COMPILE'] = {share!r}\n"
          f"jax.config.update('jax_compilation_cache_dir', {str(tmp_path)!r})\n"
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
          f"CAP = {cap}\n" + STEP)
  results, codes, outputs = run_processes(code, nproc=2, devices=2, timeout=150)
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
  return [r[0] for r in results]


@pytest.mark.multiprocess
def test_process_0_compiles_and_a_restart_compiles_nothing(tmp_path):
  first = _run(tmp_path)
  assert [r["compiles"] for r in first] == [1, 0]  # process 1 loaded process 0's executable
  assert list(tmp_path.glob("ddp_jax-*.bin"))
  restart = _run(tmp_path)
  assert [r["compiles"] for r in restart] == [0, 0]  # process 0 loaded it from the cache
  own = _run(tmp_path / "off", share="0")
  assert [r["compiles"] for r in own] == [1, 1]
  # Only jax's cache entry left: process 0 gets its executable from jax's cache, whose
  # copy cannot be serialized again (on CPU its kernels are missing), so process 1
  # must compile its own rather than load a broken one.
  for f in tmp_path.glob("ddp_jax-*.bin"):
    f.unlink()
  jax_only = _run(tmp_path)
  assert [r["compiles"] for r in jax_only] == [1, 1]
  # The same training every way, bit for bit, on both processes.
  assert (first[0]["w"] == first[1]["w"] == restart[1]["w"] == own[1]["w"]
          == jax_only[0]["w"] == jax_only[1]["w"])


@pytest.mark.multiprocess
def test_a_process_with_another_program_compiles_its_own(tmp_path):
  # The loss bakes the process index into the program (a bound no input reaches,
  # 1000 or 1001): the same training, but no executable to share.
  results = _run(tmp_path, cap="1000.0 + jax.process_index()")
  assert [r["compiles"] for r in results] == [1, 1]
  assert results[0]["w"] == results[1]["w"]
