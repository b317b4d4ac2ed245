"""What the process start-up tricks are worth to a user: wall time of a whole small `benchkit sweep`.

    .venv/bin/python benchmarks/bench_startup.py                      # 4 digits runs, 1 and 2 workers
    .venv/bin/python benchmarks/bench_startup.py --runs 8 --repeats 3

The tricks (issue 15.4 asks to keep what users feel and drop what only a micro-benchmark sees):

* ``gc``: the cyclic collector off while the command imports and plans, the long-lived heap frozen
  (``gc.freeze``) before the runs, and in the worker server before it forks;
* ``preload``: pool workers fork from a server that imported torch, MLflow and benchkit once
  (``forkserver`` preload), instead of each worker importing them itself.

Each variant runs the same sweep (timing ``pre``, so every run trains; a fresh store and dense cache
each time) through the real command, in a fresh process, and reports the median wall time of the
whole command, start-up and the workers' start included. A variant turns a trick off from outside
(``gc.disable``/``gc.freeze`` made no-ops; the worker context without preload), so the library needs
no switches for it. Needs a quiet machine for figures; ``--runs 2 --repeats 1`` is a smoke test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs `benchkit sweep` as the console script does (cli.entry), with the tricks named in argv[1] off.
DRIVER = textwrap.dedent("""\
    import gc, sys
    off = set(filter(None, sys.argv[1].split(",")))
    if "gc" in off:
        gc.disable = lambda: None
        gc.freeze = lambda: None
    if "preload" in off:
        import multiprocessing as mp
        import benchkit.executors as ex
        ex.worker_context = lambda: mp.get_context("forkserver")
    from benchkit import cli
    sys.argv = ["benchkit", *sys.argv[2:]]
    cli.entry()
    """)


def sweep_yaml(folder: Path, runs: int, epochs: int) -> Path:
    p = folder / "startup.yaml"
    p.write_text(textwrap.dedent(f"""\
        experiment: bench-startup
        base:
          data: {{name: digits}}
          model: {{name: lenet300}}
          train: {{epochs: {epochs}, batch_size: 64, lr: 0.05}}
          prune: {{timing: pre, compression: 4}}
          output_dir: {folder / 'runs'}
        grid:
          seed: {list(range(runs))}
        """))
    return p


def one(off: str, workers: int, runs: int, epochs: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        folder = Path(tmp)
        sweep = sweep_yaml(folder, runs, epochs)
        env = {**os.environ, "BENCHKIT_CACHE": str(folder / "cache"), "CI": "true",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-c", DRIVER, off, "sweep", str(sweep), "--workers", str(workers),
               "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--no-plots"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=folder)
        seconds = time.perf_counter() - t0
        if out.returncode != 0 or f"{runs} finished" not in out.stdout:
            raise SystemExit(f"variant off={off or '-'} workers={workers} failed:\n{out.stdout}\n{out.stderr}")
        return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    variants = []
    for w in (int(x) for x in args.workers.split(",")):
        offs = ["", "gc"] + (["preload", "gc,preload"] if w > 1 else [])
        variants += [(off, w) for off in offs]
    times: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: no variant always first
        for off, w in order:
            times[(off, w)].append(one(off, w, args.runs, args.epochs))
    print(f"benchkit sweep of {args.runs} digits runs ({args.epochs} epochs, timing pre), wall seconds, "
          f"median of {args.repeats}; {os.cpu_count()} cores")
    for w in sorted({w for _, w in variants}):
        base = statistics.median(times[("", w)])
        for off, ww in variants:
            if ww == w:
                m = statistics.median(times[(off, w)])
                label = "all tricks" if not off else f"without {off}"
                print(f"  workers={w}  {label:<24} {m:7.2f} s  ({m / base:.2f}x)  runs: "
                      + " ".join(f"{t:.2f}" for t in times[(off, w)]))


if __name__ == "__main__":
    main()
