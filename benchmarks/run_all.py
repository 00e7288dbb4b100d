"""Every benchmark suite in one command, then one summary: targets met or missed, and a
combined plot.

    python benchmarks/run_all.py            # suites 1-4, every hook on every tree (long)
    python benchmarks/run_all.py --quick    # ResNet-50 and 161 tiny leaves, 200 steps

1. ``bench_sync.py``: 1 process, 8 CPU devices, pmean / sync_gradients / every hook; then
   ``--paired`` for the ratio target: pmean timed right before each ``sync_gradients()``
   call, median of the per-call ratios (drift of a shared machine cancels out).
2. ``bench_cluster.py``: 4 gloo processes behind a 1 Gbit/s ``tc tbf`` loopback (skips
   with a message without ``unshare -n``/``tc``).
3. ``bench_convergence.py``: digits MLP accuracy per hook.
4. ``bench_sync.py --platform gpu --inner 20``: where jax sees a GPU (else skipped).

Writes benchmarks/out/summary.{md,png} beside each suite's own JSON/markdown/PNG.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRED_TREES = ["resnet50", "bert_base_mixed", "gpt2_small", "tiny_161x4k", "tiny_1000x1k"]
ALL_TREES = ["resnet50", "bert_base", "bert_base_mixed", "gpt2_small", "gpt2_small_mixed",
             "tiny_161x4k", "tiny_1000x1k"]


def _run(args, title):
  print(f"== {title}: {' '.join(args)}", flush=True)
  code = subprocess.run([sys.executable, *args]).returncode
  if code < 0:
    print(f"== {title}: killed by signal {-code}"
          f"{' (out of memory?)' if -code == 9 else ''}", flush=True)
  elif code:
    print(f"== {title}: exit code {code}", flush=True)
  return code


def suite_sync(trees, repeats, out: Path, methods=("all",)) -> int:
  """Suite 1, one process per tree (a tree that crashes or runs out of memory costs only
  its own rows: those measured before stay), merged into ``sync_1proc_8dev_all``. With
  ``methods`` other than ``all``, the rows measured replace their old ones."""
  sys.path.insert(0, str(HERE))
  import bench_sync

  failed, notes = 0, []
  for tree in trees:
    stem = f"sync_1proc_8dev_all_{tree}"
    update = list(methods) != ["all"]
    code = _run([str(HERE / "bench_sync.py"), "--methods", *methods, "--trees", tree,
                 "--repeats", repeats, "--tag", f"_all_{tree}", "--out", str(out),
                 *(["--update", "--paired"] if update else [])], f"suite 1: {tree}")
    if code:
      failed = failed or code
      part = _load(out / f"{stem}.partial.json")
      old = _load(out / f"{stem}.json") if update else []
      (out / f"{stem}.json").write_text(json.dumps(bench_sync.merge(old, part), indent=1))
      notes.append({"tree": tree, "method": "(the rest)",
                    "skipped": f"bench_sync.py exited with {code} after {len(part)} rows"})
  merge_sync(out, notes)
  return failed


def merge_sync(out: Path, notes=()):
  """Every tree's suite-1 table, merged into ``sync_1proc_8dev_all``."""
  sys.path.insert(0, str(HERE))
  import bench_sync
  import jax

  rows = [r for tree in ALL_TREES for r in _load(out / f"sync_1proc_8dev_all_{tree}.json")]
  bench_sync.add_ratios(rows)  # rows kept from a crashed run have none yet
  bench_sync.write(rows + list(notes), argparse.Namespace(out=str(out)),
                   f"1 process, 8 x CPU device (jax {jax.__version__})", "sync_1proc_8dev_all")


def _has_gpu() -> bool:
  probe = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices('gpu')))"],
                         capture_output=True, text=True)
  return probe.returncode == 0 and probe.stdout.strip() not in ("", "0")


def _load(path):
  return json.loads(path.read_text()) if path.exists() else []


def _row(rows, tree, method):
  return next((r for r in rows if r["tree"] == tree and r["method"] == method
               and "skipped" not in r), None)


def targets(out: Path) -> list[tuple[str, str, str, bool | None]]:
  """(target, measured, file, met) for each target of the benchmark issue."""
  res = []
  paired = _load(out / "sync_1proc_8dev_paired.json")
  for tree in PAIRED_TREES:
    auto = _row(paired, tree, "sync_auto")
    if auto:
      res.append((f"sync_gradients() / pmean <= 1.0 ({tree}, 8 CPU devices, paired)",
                  f"{auto['ratio_to_pmean']:.2f}", "sync_1proc_8dev_paired",
                  auto["ratio_to_pmean"] <= 1))
  for tree in ("resnet50", "tiny_161x4k"):
    auto = _row(paired, tree, "sync_auto")
    if auto:
      res.append((f"compile time / pmean <= 1.5 (161 leaves, {tree})",
                  f"{auto['compile_ratio_to_pmean']:.2f}", "sync_1proc_8dev_paired",
                  auto["compile_ratio_to_pmean"] <= 1.5))
  cluster = _load(out / "sync_4proc_gloo_tbf.json")
  for r in cluster:
    if "ratio_to_bound" in r:
      res.append((f"{r['method'][5:]} within 1.3x of its bound", f"{r['ratio_to_bound']:.2f}",
                  "sync_4proc_gloo_tbf", r["ratio_to_bound"] <= 1.3))
  for method, need in [("fp16_compress()", 1.8), ("int8_allreduce()", 3.0),
                       ("powersgd(rank=4, start_iter=0)", 10.0)]:
    r = _row(cluster, "resnet50", f"hook:{method}")
    if r and "speedup_vs_f32" in r:
      res.append((f"{method} >= {need:g}x faster than f32", f"{r['speedup_vs_f32']:.2f}x",
                  "sync_4proc_gloo_tbf", r["speedup_vs_f32"] >= need))
  return res


def matrix(rows) -> str:
  """Methods x trees: each sync's time relative to pmean's (its median ms in brackets;
  "p": a paired re-measurement)."""
  trees = [t for t in ALL_TREES if any(r["tree"] == t for r in rows)]
  methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "(the rest)"))
  lines = ["| method | " + " | ".join(trees) + " |", "|---|" + "---:|" * len(trees)]
  for m in methods:
    cells = []
    for t in trees:
      r = next((r for r in rows if r["tree"] == t and r["method"] == m), None)
      if r is None:
        cells.append("not run")
      elif "skipped" in r:
        cells.append("skipped (memory)" if "GiB" in r["skipped"] else "skipped")
      else:
        mark = " p" if "paired_ratio_to_pmean" in r else ""
        cells.append(f"{r.get('ratio_to_pmean', float('nan')):.2f}{mark} "
                     f"({r['median_s'] * 1e3:.0f})")
    lines.append(f"| {m.removeprefix('hook:')} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def summary(out: Path):
  sync = _load(out / "sync_1proc_8dev_all.json")
  if sync:
    (out / "sync_matrix.md").write_text(matrix(sync))
  lines = ["| target | measured | from | met |", "|---|---:|---|---|"]
  for name, value, src, met in targets(out):
    lines.append(f"| {name} | {value} | {src}.json | {'yes' if met else '**no**'} |")
  md = "\n".join(lines) + "\n"
  (out / "summary.md").write_text(md)
  print(md)
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  panels = [("sync_1proc_8dev_all.json", "8 CPU devices: time / pmean", "ratio_to_pmean"),
            ("sync_4proc_gloo_tbf.json", "1 Gbit/s cluster: time / bound", "ratio_to_bound"),
            ("convergence.json", "digits MLP: test accuracy", "accuracy"),
            ("sync_gpu_1dev_all.json", "1 GPU: ms per sync", "median_s")]
  fig, axes = plt.subplots(2, 2, figsize=(13, 9))
  for ax, (name, title, key) in zip(axes.flat, panels):
    rows = [r for r in _load(out / name) if key in r]
    if name == "convergence.json":
      labels, values = [r["hook"][:28] for r in rows], [r[key] for r in rows]
    else:
      rows = [r for r in rows if r["tree"] == "resnet50"]
      labels = [r["method"].removeprefix("hook:")[:28] for r in rows]
      values = [r[key] * (1e3 if key == "median_s" else 1) for r in rows]
    ax.barh(labels, values)
    ax.set_title(title + (" (ResNet-50)" if name != "convergence.json" else ""), fontsize=9)
    ax.tick_params(labelsize=6)
    if not rows:
      ax.text(0.5, 0.5, "not run", ha="center", transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(out / "summary.png", dpi=100)


PUBLISHED = ["summary", "sync_matrix", "sync_1proc_8dev_all", "sync_1proc_8dev_paired", "sync_4proc_gloo_tbf",
             "convergence", "sync_gpu_1dev_all"]


def publish(out: Path, dest: Path):
  import shutil

  dest.mkdir(exist_ok=True)
  for stem in PUBLISHED:
    for ext in (".md", ".png", ".json"):
      if (out / (stem + ext)).exists():
        shutil.copy(out / (stem + ext), dest / (stem + ext))
  print(f"== copied to {dest}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true")
  p.add_argument("--suites", nargs="+",
                 default=["sync", "paired", "cluster", "convergence", "gpu"])
  p.add_argument("--out", default=str(HERE / "out"))
  p.add_argument("--trees", nargs="+", default=None, help="suite 1: only these trees")
  p.add_argument("--methods", nargs="+", default=["all"],
                 help="suite 1: only these methods, measured paired with pmean, replacing "
                      "their rows in the merged table (e.g. after changing one hook)")
  p.add_argument("--publish", action="store_true",
                 help="copy the summary and each suite's table and plot to benchmarks/results/ "
                      "(the snapshot the README quotes; out/ is not committed)")
  args = p.parse_args(argv)
  trees = ["resnet50", "tiny_161x4k"] if args.quick else ALL_TREES
  repeats = "3" if args.quick else "10"
  out = ["--out", args.out]
  codes = {}
  if "sync" in args.suites:
    codes["sync"] = suite_sync(args.trees or trees, repeats, Path(args.out), args.methods)
  if "paired" in args.suites:
    codes["paired"] = _run([str(HERE / "bench_sync.py"), "--paired", "--methods", "pmean",
                            "sync_auto", "--trees", *(PAIRED_TREES[::3] if args.quick else
                                                      PAIRED_TREES),
                            "--repeats", "15", "--tag", "_paired", *out], "suite 1, paired")
  if "cluster" in args.suites:
    codes["cluster"] = _run([str(HERE / "bench_cluster.py")], "suite 2")
  if "convergence" in args.suites:
    codes["convergence"] = _run([str(HERE / "bench_convergence.py"), "--steps",
                                 "200" if args.quick else "400", *out], "suite 3")
  if "gpu" in args.suites:
    if _has_gpu():
      codes["gpu"] = _run([str(HERE / "bench_sync.py"), "--platform", "gpu", "--methods",
                           "hooks", "--inner", "20", "--trees", *trees, "--tag", "_all", *out],
                          "suite 4")
    else:
      print("== suite 4: skipped (jax sees no GPU here)")
  summary(Path(args.out))
  if args.publish:
    publish(Path(args.out), HERE / "results")
  failed = {k: v for k, v in codes.items() if v}
  if failed:
    sys.exit(f"suites failed: {failed}")


if __name__ == "__main__":
  main()
