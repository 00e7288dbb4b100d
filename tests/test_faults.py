"""Failures across processes end loudly and in bounded time (issue 13): a stuck rank, a
rank that leaves early, ranks configured differently, signals to the launcher, the
coordinator's address and port, and checkpointed hook state restored into the wrong
hook or world size."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import ddp_jax

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "mp_scripts" / "fault_script.py"
LAUNCH = [sys.executable, "-m", "ddp_jax.run"]
ENV = {**os.environ, "XLA_FLAGS": ""}


def launch(*args, timeout=120):
  t0 = time.perf_counter()
  proc = subprocess.run([*LAUNCH, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=ENV)
  return proc, time.perf_counter() - t0


def _tail(proc):
  return proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.multiprocess
def test_stuck_rank_ends_the_run_and_is_named():
  """Rank 1 sleeps before its second collective (alive, heartbeating). XLA's default
  wait is 30 minutes; with --collective-timeout 10 the run ends within ~20 s."""
  proc, elapsed = launch("--nproc-per-node", "2", "--cpu-devices", "2", "--grace-s", "2",
                         "--collective-timeout", "10", str(SCRIPT), "stuck")
  assert proc.returncode != 0, _tail(proc)
  assert "[0] STEP 1" in proc.stdout and "[0] DONE" not in proc.stdout
  assert "[0] [ddp_jax] stalled: 1" in proc.stdout, _tail(proc)
  assert "rank 1 stopped making progress" in proc.stderr, _tail(proc)
  assert elapsed < 60, elapsed


@pytest.mark.multiprocess
def test_rank_leaving_early_is_named():
  """Rank 1 ends its script (exit code 0) while rank 0 waits for it in a collective:
  before, the launcher blamed rank 0 after ~70 s."""
  proc, elapsed = launch("--nproc-per-node", "2", "--cpu-devices", "2", "--grace-s", "2",
                         "--collective-timeout", "10", str(SCRIPT), "exit0")
  assert proc.returncode != 0, _tail(proc)
  assert "rank 1 ended its script while the others still ran: it left early" in proc.stderr, \
      _tail(proc)
  assert elapsed < 60, elapsed


@pytest.mark.multiprocess
@pytest.mark.parametrize("what, says", [
    ("order", "order is 'forward' there, 'reverse' here"),
    ("hook", "hook is int8_allreduce() there, allreduce(divide='auto') here"),
    ("cap", "bucket_cap_mb is 0.0001 there, 25 here"),
    ("pack", "pack is 'variadic' there, 'auto' here"),
    ("chain", "bucket_chain is True there, False here"),
    ("host_memory", "auto_pack is 'leaves below 1048576 bytes raveled (host memory: system)' "
                    "there, 'leaves below 4194304 bytes raveled (host memory: hugepages)' here"),
    ("tree", "init_state: process 1 runs a different configuration than process 0: "
             "leaves[1] is ['c'] float32[9] there, ['c'] float32[8] here"),
])
def test_ranks_configured_differently_fail_naming_the_difference(what, says):
  """Before: a silently wrong answer (order), a hang (hook) or a gloo abort after 16-24 s
  that names nothing; now both ranks raise before the first collective."""
  proc, elapsed = launch("--nproc-per-node", "2", "--cpu-devices", "2", "--grace-s", "2",
                         str(SCRIPT), f"mismatch_{what}")
  assert proc.returncode != 0
  assert "STEP 1" not in proc.stdout  # nothing ran
  assert "process 1 runs a different configuration than process 0" in proc.stdout, _tail(proc)
  assert says in proc.stdout, _tail(proc)
  assert elapsed < 60, elapsed


@pytest.mark.multiprocess
def test_broadcast_and_unequal_parameters():
  """broadcast_from_process0 moves the tree in one collective per dtype (mixed dtypes,
  bools, scalars, empty leaves); init_state places each process's own copy (no gather of
  the tree) and refuses copies that differ, naming the leaf."""
  import json
  proc, _ = launch("--nproc-per-node", "2", "--cpu-devices", "1", str(SCRIPT), "broadcast")
  assert proc.returncode == 0, _tail(proc)
  results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines()
             if "RESULT " in line]
  dtypes = [json.loads(line.split("DTYPES ", 1)[1]) for line in proc.stdout.splitlines()
            if "DTYPES " in line]
  assert len(results) == 2 and results[0] == results[1]
  assert results[0] == {"f": [[1.5, 1.5]] * 3, "i": [0, 1, 2, 3], "b": [True, True, False],
                        "h": [0.0, 0.0], "s": 7.0, "e": []}
  placed = [json.loads(line.split("PLACED ", 1)[1]) for line in proc.stdout.splitlines()
            if "PLACED " in line]
  assert len(placed) == 2 and placed[0] == placed[1]
  assert {k: v[0] for k, v in placed[0].items()} == results[0]
  assert {v[1] for v in placed[0].values()} == {str(jax.sharding.PartitionSpec())}
  assert dtypes[0] == {"f": "float32", "i": "int32", "b": "bool", "h": "float16",
                       "s": "float32", "e": "float32"}
  proc, _ = launch("--nproc-per-node", "2", "--cpu-devices", "1", "--grace-s", "1",
                   str(SCRIPT), "unequal")
  assert proc.returncode != 0
  assert "verify_replicas: leaf ['b'] has different values on process" in proc.stdout, \
      _tail(proc)


def _sleeper(tmp_path):
  script = tmp_path / "sleeper.py"
  script.write_text("import os, time\n"
                    "open(os.environ['PIDS'] + os.environ['RANK'], 'w').write(str(os.getpid()))\n"
                    "time.sleep(120)\n")
  return script


def _stubborn(tmp_path):
  """A rank script that ignores SIGTERM (as jax's preemption handler does) and records
  its pid; the environment that tells it where."""
  script = tmp_path / "stubborn.py"
  script.write_text("import os, signal, time\n"
                    "signal.signal(signal.SIGTERM, lambda *a: None)\n"
                    "open(os.environ['PIDS'] + os.environ['RANK'], 'w').write(str(os.getpid()))\n"
                    "time.sleep(120)\n")
  return script, {**ENV, "PIDS": str(tmp_path / "pid")}


def _wait_for_pids(tmp_path):
  deadline = time.time() + 30
  while time.time() < deadline and not all((tmp_path / f"pid{r}").exists() for r in (0, 1)):
    time.sleep(0.1)
  return [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]


def _assert_gone(pids):
  for pid in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signals_to_the_launcher_stop_every_rank(tmp_path, sig, code):
  """Before: SIGTERM left both ranks running with parent PID 1."""
  env = {**ENV, "PIDS": str(tmp_path / "pid")}
  proc = subprocess.Popen([*LAUNCH, "--nproc-per-node", "2", "--grace-s", "2",
                           str(_sleeper(tmp_path))], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  pids = _wait_for_pids(tmp_path)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == code and "stopping all ranks" in err, err
  _assert_gone(pids)


@pytest.mark.multiprocess
def test_timeout_around_the_launcher_stops_every_rank(tmp_path):
  """``timeout`` (as SLURM and Kubernetes do) sends SIGTERM to the launcher only; ranks
  that ignore SIGTERM (jax's preemption handler catches it) get SIGKILL after grace."""
  script, env = _stubborn(tmp_path)
  t0 = time.perf_counter()
  proc = subprocess.Popen(["timeout", "--preserve-status", "-s", "TERM", "8", *LAUNCH,
                           "--nproc-per-node", "2", "--grace-s", "2", str(script)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  pids = _wait_for_pids(tmp_path)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err
  assert time.perf_counter() - t0 < 30
  _assert_gone(pids)


@pytest.mark.multiprocess
def test_a_second_sigterm_does_not_cut_the_stop_short(tmp_path):
  """GNU ``timeout`` signals the launcher and then its process group: two SIGTERMs.
  Before: the second one interrupted the grace wait and the launcher died with exit 1,
  leaving ranks that ignore SIGTERM running."""
  script, env = _stubborn(tmp_path)
  proc = subprocess.Popen([*LAUNCH, "--nproc-per-node", "2", "--grace-s", "2", str(script)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  pids = _wait_for_pids(tmp_path)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.3)  # inside the grace wait
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err
  _assert_gone(pids)


def _listening(pid):
  out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
  return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


@pytest.mark.multiprocess
def test_coordinator_listens_on_loopback_only(tmp_path):
  """Before: ``*:PORT`` with --master-addr 127.0.0.1."""
  import shutil
  if not shutil.which("ss"):
    pytest.skip("needs ss (iproute2)")
  proc = subprocess.Popen([*LAUNCH, "--nproc-per-node", "2", "--cpu-devices", "1",
                           "--grace-s", "1", str(SCRIPT), "serve"], cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    pids = {}
    deadline = time.time() + 60
    while len(pids) < 2 and time.time() < deadline:
      line = proc.stdout.readline()
      if "READY" in line:
        pids[line[1]] = int(line.split("READY ")[1])
    assert len(pids) == 2
    addresses = _listening(pids["0"])
    assert addresses, "process 0 listens (the coordinator)"
    for address in addresses:
      host = address.rsplit(":", 1)[0]
      assert host in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"), addresses
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)


@pytest.mark.multiprocess
def test_port_in_use_is_a_clear_error(tmp_path):
  """Before: process 0 segfaulted (exit 139)."""
  script = tmp_path / "join.py"
  script.write_text("import ddp_jax\nddp_jax.initialize(timeout_s=20)\n")
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    proc, elapsed = launch("--nproc-per-node", "2", "--master-port", str(port),
                           "--grace-s", "1", str(script), timeout=60)
  assert proc.returncode == 1, _tail(proc)
  assert f"process 0 cannot listen on 127.0.0.1:{port}" in proc.stdout, _tail(proc)
  assert "the port is in use" in proc.stdout


@pytest.mark.parametrize("args, msg", [
    (["--master-port", "70000", "x.py"], "--master-port must be in 1..65535"),
    (["--master-port", "0", "x.py"], "--master-port must be in 1..65535"),
    (["--cpu-devices", "0", "x.py"], "--cpu-devices must be >= 1"),
    (["--cpu-devices", "-3", "x.py"], "--cpu-devices must be >= 1"),
    (["--collective-timeout", "0", "x.py"], "--collective-timeout must be >= 1"),
])
def test_launcher_refuses_bad_ports_and_counts(args, msg):
  proc = subprocess.run([*LAUNCH, *args], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 2 and msg in proc.stderr, proc.stderr


@pytest.mark.parametrize("address, match", [
    ("127.0.0.1", "is not host:port"),
    ("127.0.0.1:", "must be an integer in 1..65535"),
    ("127.0.0.1:70000", "must be an integer in 1..65535"),
    ("::1:29500", "is not host:port"),
])
def test_initialize_refuses_bad_addresses_on_every_rank(monkeypatch, address, match):
  """Before: ``invalid literal for int()`` on one rank, ``list index out of range`` on the
  other; nothing changes in the process before the check."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  for process_id in (0, 1):
    with pytest.raises(ValueError, match=match):
      ddp_jax.initialize(address, 2, process_id)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_initialize_refuses_a_bad_collective_timeout(monkeypatch):
  monkeypatch.setenv("DDP_JAX_COLLECTIVE_TIMEOUT", "soon")
  with pytest.raises(ValueError, match="DDP_JAX_COLLECTIVE_TIMEOUT='soon' is not an integer"):
    ddp_jax.initialize("127.0.0.1:1234", 2, 1)
  for bad in (0, -5, 1.5, True):
    with pytest.raises(ValueError, match="collective_timeout_s must be a whole number"):
      ddp_jax.initialize("127.0.0.1:1234", 2, 1, collective_timeout_s=bad)


def test_collective_timeout_flags(monkeypatch):
  from ddp_jax import _faults
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert _faults.set_collective_timeout(30) == 30
  flags = os.environ["XLA_FLAGS"]
  assert "--xla_cpu_collective_timeout_seconds=30" in flags
  assert "--xla_gpu_first_collective_call_terminate_timeout_seconds=30" in flags
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_collective_timeout_seconds=7")
  assert _faults.set_collective_timeout(30) == 7  # the user's flag wins


def test_bind_address_gets_the_port():
  from ddp_jax._distributed import _with_port
  assert _with_port("127.0.0.1", 29500) == "127.0.0.1:29500"
  assert _with_port("0.0.0.0:1234", 29500) == "0.0.0.0:1234"
  assert _with_port("::", 29500) == "[::]:29500"
  assert _with_port("[::1]", 29500) == "[::1]:29500"


def test_diagnosis_ignores_errors_that_are_not_collective_failures():
  from ddp_jax import _faults
  assert not _faults.is_collective_failure(ValueError("sync_gradients: collectives differ"))
  assert _faults.is_collective_failure(
      RuntimeError("UNKNOWN: Gloo all-reduce failed: ... Timed out waiting 7000ms"))
  assert _faults.diagnose(ValueError("x")) is None


def test_difference_names_the_first_differing_field():
  from ddp_jax._faults import _difference
  a = [{"order": "'reverse'", "hook": "allreduce()", "leaves": ["w f32[2]", "b f32[3]"]}]
  b = [{"order": "'reverse'", "hook": "allreduce()", "leaves": ["w f32[2]", "b f32[4]"]}]
  assert _difference(a, a) is None
  assert _difference(a, b) == "leaves[1] is b f32[4] there, b f32[3] here"
  assert _difference(a, []) == "0 gradient syncs in its step, 1 here"


# ---- checkpoints: the hook state knows which hook and world size made it ----------------

def _sync_step(mesh, hook):
  tx = optax.chain(ddp_jax.sync_gradients("data", hook=hook), optax.sgd(0.1))

  def step(p, s, x):
    g = ddp_jax.grad(lambda p, x: jnp.sum(p["w"] * x.mean()) + jnp.sum(p["w"] ** 2), "data")(
        p, x)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return tx, ddp_jax.data_parallel(step, mesh, "data", batch_argnums=2)


PARAMS = {"w": jnp.linspace(-1.0, 1.0, 48).reshape(8, 6)}


def test_restoring_into_another_hook_is_refused(mesh8):
  """Before: a powersgd state restored into a topk hook was accepted (its residual reused)."""
  tx1, step1 = _sync_step(mesh8, ddp_jax.hooks.powersgd(rank=1, start_iter=0))
  state = ddp_jax.init_state(tx1, PARAMS, mesh8, "data")
  _, state = step1(PARAMS, state, np.arange(8.0, dtype=np.float32))
  saved = serialization.to_bytes(state)
  tx2, step2 = _sync_step(mesh8, ddp_jax.hooks.topk(0.5))
  target = ddp_jax.init_state(tx2, PARAMS, mesh8, "data")
  with pytest.raises(ValueError, match="made by another hook, hook configuration or bucket"):
    serialization.from_bytes(target, saved)
  # The same hook with another configuration is another hook too.
  tx3, _ = _sync_step(mesh8, ddp_jax.hooks.powersgd(rank=2, start_iter=0))
  with pytest.raises(ValueError, match="made by another hook"):
    serialization.from_bytes(ddp_jax.init_state(tx3, PARAMS, mesh8, "data"), saved)
  # Into the hook that saved it: accepted, bit-identical.
  back = serialization.from_bytes(ddp_jax.init_state(tx1, PARAMS, mesh8, "data"), saved)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_state_restored_by_other_means_fails_at_the_first_step(mesh8):
  """orbax or a hand-built tree bypasses flax's restore hook: the data_parallel step
  refuses it on its first call (host side: the program stays free of host callbacks, so
  jax's persistent compilation cache keeps it)."""
  import dataclasses
  _, step1 = _sync_step(mesh8, ddp_jax.hooks.topk(0.5))
  tx1, _ = _sync_step(mesh8, ddp_jax.hooks.topk(0.5))
  tx2, step2 = _sync_step(mesh8, ddp_jax.hooks.topk(0.25))
  good = ddp_jax.init_state(tx2, PARAMS, mesh8, "data")
  other_tag = ddp_jax.init_state(tx1, PARAMS, mesh8, "data")[0].tag
  forged = (dataclasses.replace(good[0], tag=other_tag), *good[1:])
  with pytest.raises(ValueError, match="the step's first call: the sync state was made by "
                                       "another hook"):
    step2(PARAMS, forged, np.ones(8, np.float32))
  assert "callback" not in step2.lower(PARAMS, good, np.ones(8, np.float32)).as_text()
  jax.block_until_ready(step2(PARAMS, good, np.ones(8, np.float32)))  # the right one runs


def test_restoring_on_another_world_size_says_how_to_resize(mesh8):
  """Before: the error blamed "another model or hook"."""
  mesh4 = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  hook = ddp_jax.hooks.error_feedback(ddp_jax.hooks.int8_allreduce())
  tx, step8 = _sync_step(mesh8, hook)
  state8 = ddp_jax.init_state(tx, PARAMS, mesh8, "data")
  _, state8 = step8(PARAMS, state8, np.arange(8.0, dtype=np.float32))
  saved = serialization.to_bytes(state8)
  target4 = ddp_jax.init_state(tx, PARAMS, mesh4, "data")
  with pytest.raises(ValueError, match="saved with 8 replicas, this state has 4.*resize_state"):
    serialization.from_bytes(target4, saved)
  # Resized: the residuals' contribution to the averaged gradient is kept.
  restored8 = serialization.from_bytes(state8, saved)
  state4 = ddp_jax.resize_state(restored8, 4)
  r8 = np.asarray(restored8[0].hook_states[0].residual)
  r4 = np.asarray(state4[0].hook_states[0].residual)
  assert r8.shape[0] == 8 and r4.shape[0] == 4 and np.any(r8)
  # Every new replica holds the exact mean of the saved residuals, rounded once to f32
  # (|error| <= 2**-24 relative), so sum(r4)/4 == sum(r8)/8 up to that rounding.
  exact = r8.astype(np.float64).mean(0)
  for row in r4:
    np.testing.assert_allclose(row, exact, rtol=1.01 * 2.0**-24, atol=0)
  _, step4 = _sync_step(mesh4, hook)
  params, state4 = step4(PARAMS, state4, np.arange(4.0, dtype=np.float32))  # it runs
  assert np.all(np.isfinite(np.asarray(params["w"])))


def test_resize_keeps_replica_equal_state_and_refuses_partial_sums():
  tx = ddp_jax.sync_gradients("data", hook=ddp_jax.hooks.powersgd(rank=1, start_iter=0))
  state = tx.init({"w": jnp.ones((8, 6))})
  state = jax.tree.map(lambda x: np.repeat(np.asarray(x), 3, axis=0) if np.ndim(x) else x,
                       state)
  big = ddp_jax.resize_state(state, 5)
  assert isinstance(big.hook_states[0], ddp_jax.hooks.PowerSGDState)
  for key in ("q", "key", "iter"):  # replica-equal state: replica 0's, on every new replica
    for a, b in zip(jax.tree.leaves(getattr(big.hook_states[0], key)),
                    jax.tree.leaves(getattr(state.hook_states[0], key))):
      assert a.shape[0] == 5
      np.testing.assert_array_equal(a[4], np.asarray(b)[0])
  acc = ddp_jax.accumulate(optax.chain(ddp_jax.sync_gradients("data"), optax.sgd(1.0)), 2)
  astate = acc.init({"w": jnp.ones(3)})
  ddp_jax.resize_state(astate, 4)  # zero sums: fine
  astate = astate._replace(acc=jax.tree.map(lambda x: x + 1, astate.acc))
  with pytest.raises(ValueError, match="accumulated on each replica.*accumulation boundary"):
    ddp_jax.resize_state(astate, 4)


def test_every_hook_factory_records_its_configuration():
  """Checkpoint tags and the cross-process check compare a hook's configuration: every
  factory a command line can name must record it."""
  for name in ddp_jax.hooks.FACTORIES:
    factory = getattr(ddp_jax.hooks, name)
    assert hasattr(factory, "__wrapped__"), f"{name} is not decorated with @configured"
  h = ddp_jax.hooks.parse("fp16_compress_wrapper(powersgd(rank=2))")
  assert h.config.startswith("fp16_compress_wrapper(hook=powersgd(rank=2, start_iter=1000")
  assert ddp_jax.hooks.powersgd(rank=2).config != ddp_jax.hooks.powersgd(rank=3).config
