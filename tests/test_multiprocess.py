"""Several processes through ddp-jax-run (gloo CPU collectives on localhost), the
launcher's failure handling, initialize's settings, and DistributedSampler semantics."""

import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ddp_jax

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "mp_scripts" / "sync_script.py"
LAUNCH = [sys.executable, "-m", "ddp_jax.run"]


def launch(*args, timeout=180):
  proc = subprocess.run([*LAUNCH, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env={**__import__("os").environ, "XLA_FLAGS": ""})
  results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines()
             if "RESULT " in line]
  return proc, results


def grads_for(device_index, step):  # the same gradients as the script's
  rng = np.random.default_rng(1000 * step + device_index)
  return {"w": rng.standard_normal((16, 12)).astype(np.float32),
          "b": rng.standard_normal((12,)).astype(np.float32)}


@pytest.mark.multiprocess
def test_two_processes_match_one_process_mesh():
  """2 processes x 2 CPU devices give the synced gradients of 1 process x 4 devices."""
  proc, results = launch("--nproc-per-node", "2", "--cpu-devices", "2", str(SCRIPT), "sync")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "[0] RESULT" in proc.stdout and "[1] RESULT" in proc.stdout  # rank prefixes
  mesh4 = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  hooks = {"allreduce": ddp_jax.hooks.allreduce(),
           "powersgd": ddp_jax.hooks.powersgd(rank=2, start_iter=1),
           "int8_ef": ddp_jax.hooks.error_feedback(ddp_jax.hooks.int8_allreduce())}
  for name, hook in hooks.items():
    tx = ddp_jax.sync_gradients("data", hook=hook)
    state = ddp_jax.init_state(tx, grads_for(0, 0), mesh4, "data")
    specs = ddp_jax.state_specs(state, "data")
    fn = jax.jit(jax.shard_map(lambda s, g, tx=tx: tx.update(jax.tree.map(lambda x: x[0], g), s),
                               mesh=mesh4, in_specs=(specs, P("data")), out_specs=(P(), specs)))
    for step in range(3):
      stacked = jax.tree.map(lambda *xs: np.stack(xs), *[grads_for(i, step) for i in range(4)])
      u, state = fn(state, ddp_jax.shard(stacked, mesh4, "data"))
    got = [r for r in results if r["hook"] == name]
    assert sorted(r["rank"] for r in got) == [0, 1]
    for r in got:
      for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(r["u"][k]), np.asarray(u[k]), rtol=1e-5,
                                   atol=1e-5, err_msg=f"{name} {k} rank {r['rank']}")


@pytest.mark.multiprocess
def test_hierarchical_two_processes_match_one_process():
  """node = process: 2 processes x 2 devices against a 2 x 2 mesh in this process."""
  proc, results = launch("--nproc-per-node", "2", "--cpu-devices", "2", str(SCRIPT), "hier")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  axes = ("node", "local")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), axes)
  for name, inner in [("allreduce", ddp_jax.hooks.allreduce()),
                      ("fp16", ddp_jax.hooks.fp16_compress())]:
    tx = ddp_jax.sync_gradients(axes, hook=ddp_jax.hooks.hierarchical(inner, local_size=2))
    state = ddp_jax.init_state(tx, grads_for(0, 0), mesh, axes)
    specs = ddp_jax.state_specs(state, axes)
    fn = jax.jit(jax.shard_map(lambda s, g, tx=tx: tx.update(jax.tree.map(lambda x: x[0], g), s),
                               mesh=mesh, in_specs=(specs, P(axes)), out_specs=(P(), specs)))
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *[grads_for(i, 0) for i in range(4)])
    u, _ = fn(state, ddp_jax.shard(stacked, mesh, axes))
    got = [r for r in results if r["hook"] == name]
    assert len(got) == 2
    for r in got:
      for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(r["u"][k]), np.asarray(u[k]), rtol=1e-6,
                                   atol=1e-6, err_msg=f"{name} {k}")


@pytest.mark.multiprocess
def test_two_processes_train_identically():
  proc, results = launch("--nproc-per-node", "2", "--cpu-devices", "2", str(SCRIPT), "train")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert len(results) == 2 and results[0]["w_sum"] == results[1]["w_sum"]
  assert abs(results[0]["w00"] - 0.1) > 1e-4  # trained away from process 0's start
  # SGD: the same parameters as one device on the whole batch (f32 summation order only).
  assert results[0]["diff_vs_one_device"] < 1e-6, results


@pytest.mark.multiprocess
def test_two_processes_switch_from_the_warmup_program_together():
  proc, results = launch("--nproc-per-node", "2", "--cpu-devices", "2", str(SCRIPT), "warmup")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert len(results) == 2
  for r in results:
    # calls 1-2 run the warm-up program; the full one from call 3
    assert r["programs"] == ["warm-up"] * 2 + ["full"] * 3
    assert r["warm"] == r["full"]  # bit for bit: the same numbers as the full program
  assert results[0]["warm"] == results[1]["warm"]


@pytest.mark.multiprocess
def test_warmup_setting_differing_between_processes_is_refused():
  proc, results = launch("--nproc-per-node", "2", "--cpu-devices", "2", str(SCRIPT),
                         "warmup_mismatch")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert len(results) == 2
  for r in results:  # both refuse, naming what differs
    assert r["error"] and "different configuration" in r["error"], r
    assert "warm-up program" in r["error"], r


@pytest.mark.multiprocess
def test_failing_rank_stops_the_others_promptly():
  t0 = time.perf_counter()
  proc, _ = launch("--nproc-per-node", "2", "--grace-s", "2", str(SCRIPT), "fail", timeout=60)
  elapsed = time.perf_counter() - t0
  assert proc.returncode == 1
  assert "ddp-jax-run: rank 1 exited with code 1; stopping the other ranks" in proc.stderr
  assert "[1] rank 1 failing on purpose" in proc.stdout
  assert "[1] RuntimeError: boom" in proc.stdout  # the child's traceback, rank-prefixed
  assert elapsed < 45  # rank 0 would sleep 120 s


def test_launcher_bad_args():
  for args, msg in [(["--nproc-per-node", "0", "x.py"], "--nproc-per-node must be >= 1"),
                    (["--nnodes", "2", "x.py"], "--master-port is required"),
                    (["--nnodes", "2", "--node-rank", "2", "--master-port", "1", "x.py"],
                     "--node-rank must be in")]:
    proc = subprocess.run([*LAUNCH, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and msg in proc.stderr


def test_launcher_env(tmp_path, monkeypatch):
  from ddp_jax.run import child_env, parse_args
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.delenv("DDP_JAX_COMPILATION_CACHE", raising=False)
  args = parse_args(["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "4",
                     "--master-addr", "10.1.2.3", "--master-port", "29500", "t.py", "--lr", "1"])
  env = child_env(args, 2, 29500)
  assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("6", "8", "2")
  assert env["MASTER_ADDR"] == "10.1.2.3" and env["DDP_JAX_COORDINATOR"] == "10.1.2.3:29500"
  assert args.script_args == ["--lr", "1"]
  # jax's persistent compilation cache: a restart does not recompile.
  assert env["JAX_COMPILATION_CACHE_DIR"].endswith("/.cache/ddp_jax/xla")
  off = parse_args(["--compilation-cache", "off", "t.py"])
  assert "JAX_COMPILATION_CACHE_DIR" not in child_env(off, 0, 1)
  mine = parse_args(["--compilation-cache", str(tmp_path), "t.py"])
  assert child_env(mine, 0, 1)["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path)


def test_launcher_host_memory(monkeypatch):
  from ddp_jax._host_memory import REUSE_ENV, host_memory_mode
  from ddp_jax.run import child_env, parse_args
  for key in (*REUSE_ENV, "GLIBC_TUNABLES"):
    monkeypatch.delenv(key, raising=False)
  env = child_env(parse_args(["t.py"]), 0, 1)  # default: huge pages
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and host_memory_mode(env) == "hugepages"
  env = child_env(parse_args(["--host-memory", "reuse", "t.py"]), 0, 1)
  assert {k: env[k] for k in REUSE_ENV} == REUSE_ENV and host_memory_mode(env) == "reuse"
  env = child_env(parse_args(["--host-memory", "system", "t.py"]), 0, 1)
  assert not any(k in env for k in (*REUSE_ENV, "GLIBC_TUNABLES"))
  assert host_memory_mode(env) == "system"
  monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's own values win
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  env = child_env(parse_args(["--host-memory", "reuse", "t.py"]), 0, 1)
  assert env["MALLOC_ARENA_MAX"] == "4" and host_memory_mode(env) == "system"
  assert child_env(parse_args(["t.py"]), 0, 1)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
  assert host_memory_mode({**REUSE_ENV, "MALLOC_TRIM_THRESHOLD_": "131072"}) == "system"
  with pytest.raises(SystemExit):
    parse_args(["--host-memory", "lots", "t.py"])


def test_auto_pack_follows_host_memory_across_processes(monkeypatch):
  """pack='auto' ravels leaves below 4 MiB across processes started with huge pages or
  reused memory (bench_peer, ResNet-50: 221 ms against 300 ms with the 1 MiB rule), below
  1 MiB otherwise; a 2 MiB and an 8-element leaf, and a 4 MiB leaf that always travels alone."""
  from ddp_jax import _pack
  from ddp_jax._host_memory import REUSE_ENV
  spec = ddp_jax.plan_buckets([jax.numpy.zeros((1 << 19,)), jax.numpy.zeros((8,)),
                               jax.numpy.zeros((1 << 20,))], first_bucket_cap_mb=25).buckets[0]
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  def sizes(groups):  # each operand's leaf lengths
    return sorted(sorted(spec.lengths[i] for i in g) for g in groups)

  alone, together = [[8], [1 << 19], [1 << 20]], [[8, 1 << 19], [1 << 20]]
  for mode, env, expect in [("system", {}, alone),
                            ("hugepages", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, together),
                            ("reuse", {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                                       "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}, together)]:
    for key in (*REUSE_ENV, "GLIBC_TUNABLES"):
      monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
      monkeypatch.setenv(key, value)
    assert sizes(_pack.operand_groups(spec, "auto")) == expect, mode
    assert _pack.auto_rule().endswith(f"(host memory: {mode})")
  monkeypatch.setattr(jax, "process_count", lambda: 1)  # one process: 64 KiB, whatever the env
  assert sizes(_pack.operand_groups(spec, "auto")) == alone


@pytest.mark.multiprocess
def test_launcher_host_memory_saves_page_faults():
  """A step's fresh 100 MB output: with glibc's defaults every call maps it anew and
  takes a page fault per 4 KiB (~24k); ddp-jax-run's default asks for huge pages."""
  script = ROOT / "tests" / "mp_scripts" / "host_memory_script.py"
  faults = {}
  for mode in ("hugepages", "system"):
    proc, results = launch("--host-memory", mode, str(script), timeout=120)
    assert proc.returncode == 0 and len(results) == 1, proc.stderr[-2000:]
    assert results[0]["mode"] == mode
    faults[mode] = results[0]["faults_per_call"]
  thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
  if not thp.exists() or "[never]" in thp.read_text():
    pytest.skip("transparent huge pages are off on this machine")
  assert faults["system"] > 20_000 and faults["hugepages"] < faults["system"] / 10, faults


@pytest.mark.parametrize("env, match", [
    ({"MASTER_ADDR": "127.0.0.1"}, "MASTER_ADDR and MASTER_PORT must be set together"),
    ({"MASTER_ADDR": "h", "MASTER_PORT": "x1"}, r"MASTER_PORT='x1' is not an integer"),
    ({"MASTER_ADDR": "h", "MASTER_PORT": "1", "WORLD_SIZE": "2"},
     "give the coordinator address, the number of processes and this process's id together"),
    ({"MASTER_ADDR": "h", "MASTER_PORT": "1", "WORLD_SIZE": "2", "RANK": "2"},
     r"process_id 2 is not in \[0, 2\)"),
])
def test_initialize_bad_settings(monkeypatch, env, match):
  for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "DDP_JAX_COORDINATOR",
               "DDP_JAX_NUM_PROCESSES", "DDP_JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(ValueError, match=match):
    ddp_jax.initialize()


@pytest.mark.multiprocess
def test_initialize_times_out_with_a_message():
  code = ("import ddp_jax\n"
          "try:\n"
          "  ddp_jax.initialize('127.0.0.1:1', 2, 1, timeout_s=3)\n"
          "except RuntimeError as e:\n"
          "  print('MSG', e)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=ROOT)
  assert "could not join 2 processes at 127.0.0.1:1 as process 1 within 3 s" in proc.stdout


@pytest.mark.conformance
@pytest.mark.parametrize("n, world, drop_last", [(10, 3, False), (10, 3, True), (7, 4, False),
                                                 (16, 4, True), (5, 8, False)])
def test_shard_indices_like_distributed_sampler(n, world, drop_last):
  torch_data = pytest.importorskip("torch.utils.data")
  for rank in range(world):
    theirs = list(torch_data.DistributedSampler(range(n), num_replicas=world, rank=rank,
                                                shuffle=False, drop_last=drop_last))
    ours = ddp_jax.shard_indices(n, shuffle=False, num_replicas=world, rank=rank,
                                 drop_last=drop_last).tolist()
    assert ours == theirs


def test_shard_indices_shuffle_partition():
  parts = [ddp_jax.shard_indices(100, epoch=3, num_replicas=4, rank=r) for r in range(4)]
  assert sorted(np.concatenate(parts).tolist()) == list(range(100))
  again = ddp_jax.shard_indices(100, epoch=3, num_replicas=4, rank=1)
  other_epoch = ddp_jax.shard_indices(100, epoch=4, num_replicas=4, rank=1)
  assert np.array_equal(parts[1], again) and not np.array_equal(parts[1], other_epoch)
  with pytest.raises(ValueError, match=r"rank 4 is not in \[0, 4\)"):
    ddp_jax.shard_indices(10, num_replicas=4, rank=4)


def test_global_batch_single_process(mesh8):
  x = np.arange(16.0).reshape(8, 2)
  g = ddp_jax.global_batch({"x": x}, mesh8)
  assert g["x"].sharding.spec == P("data") and np.array_equal(np.asarray(g["x"]), x)



@pytest.mark.multiprocess
def test_ctrl_c_stops_every_rank(tmp_path):
  import os
  import signal
  script = tmp_path / "sleeper.py"
  script.write_text("import os, time\n"
                    "open(os.environ['PIDS'] + os.environ['RANK'], 'w').write(str(os.getpid()))\n"
                    "time.sleep(120)\n")
  env = {**os.environ, "PIDS": str(tmp_path / "pid")}
  proc = subprocess.Popen([*LAUNCH, "--nproc-per-node", "2", "--grace-s", "2", str(script)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 30
  while time.time() < deadline and not all((tmp_path / f"pid{r}").exists() for r in (0, 1)):
    time.sleep(0.1)
  pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 130 and "interrupted, stopping all ranks" in err
  for pid in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def test_console_script_installed():
  import shutil
  exe = shutil.which("ddp-jax-run")
  assert exe, "pip install -e . installs the ddp-jax-run console script"
  out = subprocess.run([exe, "--help"], capture_output=True, text=True)
  assert out.returncode == 0 and "--nproc-per-node" in out.stdout


@pytest.mark.multiprocess
def test_initialize_without_any_cluster_says_how():
  code = ("import ddp_jax\n"
          "try:\n"
          "  ddp_jax.initialize()\n"
          "except RuntimeError as e:\n"
          "  print('MSG', e)\n")
  env = {k: v for k, v in __import__("os").environ.items()
         if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
         and not k.startswith("DDP_JAX_") and not k.startswith("SLURM")}
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=ROOT, env=env)
  assert "no cluster configured and jax found none to detect" in proc.stdout
  assert "Launch with ddp-jax-run" in proc.stdout
