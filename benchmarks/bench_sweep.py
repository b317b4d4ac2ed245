"""Sweep throughput (2 local workers vs 1) and MLflow tracking overhead per run.

    .venv/bin/python benchmarks/bench_sweep.py                 # both parts
    .venv/bin/python benchmarks/bench_sweep.py --part throughput --runs 12
    .venv/bin/python benchmarks/bench_sweep.py --part overhead --repeats 3
    .venv/bin/python benchmarks/bench_sweep.py --part throughput --epochs 150 --repeats 0 --abba 5  # 1/2/2/1 blocks

throughput: the same digits sweep (timing `pre`: every run trains, no dense cache to share; 16 runs
of 40 epochs, a few seconds each, as a real sweep's runs are) run through `benchkit sweep` with
--workers 1 and --workers 2, each into a fresh store; wall time of the whole command, process
start-up and the workers' start included (with runs of a fraction of a second, that start-up is most
of the sweep). Goal on 2 cores: >= 1.6x. A third sweep, 1 worker held to 1 torch thread, shows how
much of the 1-worker baseline's speed comes from intra-op threading (which 2 workers at 1 thread each
give up). ``--repeats`` rounds of the three sweeps, the order rotated each round: medians reported.

overhead: a 1-epoch LeNet-300-100 run on Fashion-MNIST (from ../shared/data) timed as
PruningExperiment.run() alone, and through the sweep's per-run path ``run_tracked`` (dedup
searches, run + params, metrics, artifacts, plots, end) whose tracking cost is its wall time minus
the run() inside it; alternating in one process after a warm-up run, so both see the same machine
state. Goal: tracking <= 2% of the run.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BENCHKIT_DATA", REPO.parent / "shared" / "data"))


def sweep_yaml(folder: Path, runs: int, epochs: int, data: str) -> Path:
    seeds = list(range(max(1, runs // 4)))
    source = "{name: digits}" if data == "digits" else f"{{name: {data}, root: {DATA}, download: false}}"
    p = folder / "bench.yaml"
    p.write_text(textwrap.dedent(f"""\
        experiment: bench-throughput
        base:
          data: {source}
          model: {{name: lenet300}}
          train: {{epochs: {epochs}, batch_size: 64, lr: 0.05}}
          prune: {{timing: pre, compression: 4}}
          output_dir: {folder / 'runs'}
        grid:
          prune.criterion: [magnitude, random]
          prune.scope: [global, layer]
          seed: {seeds}
        """))
    return p


VARIANTS = (("w1", 1, []), ("w2", 2, []), ("w1t1", 1, ["threads=1"]))


def cpu_jiffies() -> list[int] | None:
    """The machine's cumulative CPU time by state (/proc/stat: user nice system idle iowait irq softirq
    steal ...), or None off Linux. Steal is time the hypervisor gave our vCPUs to another guest: on a
    shared VM it, not the code, is what moves the 2-workers/1 ratio between otherwise identical runs."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Fraction of all CPU time between two ``cpu_jiffies`` readings that was stolen."""
    if not before or not after or len(before) < 8:
        return None
    delta = [a - b for a, b in zip(after, before)]
    return delta[7] / max(1, sum(delta[:8]))


def timed_sweep(cmd: list[str], env: dict[str, str]) -> tuple[float, list[float]]:
    """Run ``benchkit sweep``; (whole-command wall time, the time each run's result was printed)."""
    t0 = time.perf_counter()
    done: list[float] = []
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[") and line.split("]", 1)[-1].lstrip().startswith("finished"):
            done.append(time.perf_counter() - t0)
    if proc.wait() != 0:
        raise SystemExit("".join(lines))
    return time.perf_counter() - t0, done


def one_sweep(tmp: Path, sweep: Path, env: dict[str, str], name: str, workers: int, extra: list[str],
              runs: int) -> tuple[float, list[float], float | None]:
    """One ``benchkit sweep`` into a fresh store ``name``: (wall time, when each result came, CPU stolen)."""
    uri = f"sqlite:///{tmp / f'{name}.db'}"
    # create the store first: its one-off schema migration is not sweep throughput
    subprocess.run([sys.executable, "-c", f"from benchkit.tracking import Tracker; Tracker({uri!r}).client"],
                   check=True, env=env, cwd=REPO)
    before = cpu_jiffies()
    total, done = timed_sweep([sys.executable, "-m", "benchkit.cli", "sweep", str(sweep), *extra, "--workers",
                               str(workers), "--tracking-uri", uri], env)
    stolen = steal_share(before, cpu_jiffies())
    if len(done) != runs:
        raise SystemExit(f"{name}: {len(done)} of {runs} runs finished")
    return total, done, stolen


def abba(runs: int, epochs: int, data: str, blocks: int) -> list[tuple[float, float]]:
    """The goal's two sweeps alone, in mirrored blocks: 1 worker, 2 workers, 2 workers, 1 worker.

    Per block, (whole-command speedup, steady-state speedup) of the two 2-worker sweeps over the two
    1-worker sweeps. The mirrored order cancels a machine whose speed drifts linearly over the block's
    two minutes; rotating three variants leaves a pair up to two sweeps apart."""
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-abba-") as tmp:
        tmp = Path(tmp)
        p = sweep_yaml(tmp, runs, epochs, data)
        env = {**os.environ, "BENCHKIT_CACHE": str(tmp / "cache"), "CI": "true"}
        for b in range(blocks):
            whole, rate = {1: 0.0, 2: 0.0}, {1: 0.0, 2: 0.0}
            for i, workers in enumerate((1, 2, 2, 1)):
                total, done, _ = one_sweep(tmp, p, env, f"abba-{b}-{i}", workers, [], runs)
                whole[workers] += total
                rate[workers] += (runs - workers) / (done[-1] - done[workers - 1])
            out.append((whole[1] / whole[2], rate[2] / rate[1]))
            print(f"  block {b + 1}/{blocks}: whole {out[-1][0]:.2f}x, steady {out[-1][1]:.2f}x", flush=True)
    return out


def throughput(runs: int, epochs: int, data: str, repeats: int = 1) -> dict[str, Any]:
    """Wall time of each variant's whole ``benchkit sweep`` command, ``repeats`` times, the order
    rotated every repeat, and its steady-state rate.

    Variants: 1 worker with torch's default threads (all cores: the baseline), 2 workers (a core
    each), and 1 worker held to 1 thread (how much of the baseline's speed is intra-op threading).
    Each sweep goes into a fresh store. Steady state: runs per second from the first round of
    results to the last, i.e. (runs - workers) / (t_last - t_workers), where start-up (imports,
    worker start, a first run's lazy initialisation) is over; it is what a long sweep converges to."""
    times: dict[str, list[float]] = {key: [] for key, _, _ in VARIANTS}
    rates: dict[str, list[float]] = {key: [] for key, _, _ in VARIANTS}
    first: dict[str, list[float]] = {key: [] for key, _, _ in VARIANTS}
    steal: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        tmp = Path(tmp)
        p = sweep_yaml(tmp, runs, epochs, data)
        env = {**os.environ, "BENCHKIT_CACHE": str(tmp / "cache"), "CI": "true"}
        for r in range(repeats):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for key, workers, extra in order:
                total, done, stolen = one_sweep(tmp, p, env, f"{key}-{r}", workers, extra, runs)
                times[key].append(total)
                first[key].append(done[0])
                rates[key].append((runs - workers) / (done[-1] - done[workers - 1]))
                if stolen is not None:
                    steal.append(stolen)
                print(f"  repeat {r + 1}/{repeats} {key}: {total:.1f}s, first result at {done[0]:.1f}s, "
                      f"steady {rates[key][-1]:.3f} runs/s"
                      + (f", CPU stolen by the host {stolen:.1%}" if stolen is not None else ""), flush=True)
    med = statistics.median
    res: dict[str, Any] = {f"{key}_s": med(v) for key, v in times.items()}
    res.update({f"{key}_first_s": med(v) for key, v in first.items()})
    res.update({f"{key}_rate": med(v) for key, v in rates.items()})
    res["steal_max"] = max(steal) if steal else None
    res["speedup"] = res["w1_s"] / res["w2_s"]
    res["speedup_paired"] = med(a / b for a, b in zip(times["w1"], times["w2"]))
    res["speedup_vs_1thread"] = res["w1t1_s"] / res["w2_s"]
    res["steady_speedup"] = res["w2_rate"] / res["w1_rate"]
    res["steady_speedup_paired"] = med(b / a for a, b in zip(rates["w1"], rates["w2"]))
    res["steady_speedup_vs_1thread"] = res["w2_rate"] / res["w1t1_rate"]
    return res


def overhead(repeats: int) -> dict[str, float]:
    """Tracking cost of ``run_tracked`` (the sweep's per-run path: dedup searches, run creation with
    params, metrics, artifacts, plots, end) = its wall time minus the experiment's own ``run()``,
    next to untracked ``run()`` calls of the same config, alternating."""
    import torch

    torch.set_num_threads(1)
    import benchkit.experiment as experiment
    from benchkit.sweep import RunTask, run_tracked
    from benchkit.tracking import Tracker
    from benchkit.validation import load_config

    if not (DATA / "FashionMNIST" / "raw").is_dir():
        raise SystemExit(f"Fashion-MNIST not found under {DATA}; set BENCHKIT_DATA")
    inner: list[float] = []
    real_run = experiment.PruningExperiment.run

    def timed_run(self):
        t0 = time.perf_counter()
        try:
            return real_run(self)
        finally:
            inner.append(time.perf_counter() - t0)

    experiment.PruningExperiment.run = timed_run
    with tempfile.TemporaryDirectory(prefix="bench-track-") as tmp:
        os.environ["BENCHKIT_CACHE"] = str(Path(tmp) / "cache")
        base = load_config({
            "experiment": "bench-overhead", "threads": 1, "output_dir": str(Path(tmp) / "runs"),
            "data": {"name": "fashion-mnist", "root": str(DATA), "download": False},
            "model": {"name": "lenet300"}, "train": {"epochs": 1, "batch_size": 60, "lr": 0.1},
            "prune": {"timing": "pre", "criterion": "magnitude", "compression": 8},
        })
        tracker = Tracker(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        exp = tracker.ensure_experiment("bench-overhead")

        def tracked(cfg, plots: bool) -> tuple[float, float]:
            task = RunTask(0, cfg.to_dict(), cfg.config_hash(), "bench", {}, exp, tracker.uri, "bench", plots=plots)
            t0 = time.perf_counter()
            outcome = run_tracked(task)
            total = time.perf_counter() - t0
            assert outcome.status == "finished", outcome
            return inner[-1], total - inner[-1]

        tracked(base.replace(seed=100), True)  # warm-up: imports, fonts, store connection, data in page cache
        alone, tracking, tracking_noplots = [], [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            experiment.PruningExperiment(base.replace(seed=i)).run()
            alone.append(time.perf_counter() - t0)
            tracking.append(tracked(base.replace(seed=i), True)[1])
            tracking_noplots.append(tracked(base.replace(seed=1000 + i), False)[1])
    experiment.PruningExperiment.run = real_run
    run_med = statistics.median(alone)
    return {"run_alone_s": run_med, "tracking_s": statistics.median(tracking),
            "tracking_noplots_s": statistics.median(tracking_noplots),
            "tracking_pct": 100 * statistics.median(tracking) / run_med,
            "tracking_noplots_pct": 100 * statistics.median(tracking_noplots) / run_med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["throughput", "overhead", "all"], default="all")
    ap.add_argument("--runs", type=int, default=16, help="throughput: runs in the sweep (multiple of 4)")
    ap.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"],
                    help="throughput: the runs' dataset (fashion-mnist from BENCHKIT_DATA: ~2 s per epoch)")
    ap.add_argument("--epochs", type=int, default=40,
                    help="throughput: training epochs per run (digits; 40 = a few seconds, so the sweep's "
                         "work, not process start-up, is what is measured)")
    ap.add_argument("--abba", type=int, default=0, metavar="N",
                    help="throughput: then N blocks of the 1- and 2-worker sweeps alone, in the order 1, 2, 2, 1")
    ap.add_argument("--repeats", type=int, default=3,
                    help="overhead: timed pairs; throughput: rounds of the three sweeps (medians reported)")
    args = ap.parse_args()
    if args.runs < 4 or args.runs % 4:  # the grid is 2 criteria x 2 scopes x runs/4 seeds
        ap.error(f"--runs must be a positive multiple of 4, got {args.runs}")
    load = os.getloadavg()
    print(f"# cores={len(os.sched_getaffinity(0))} load(1/5/15 min)={load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")
    if args.part in ("throughput", "all") and args.repeats > 0:
        t = throughput(args.runs, args.epochs, args.data, args.repeats)
        print(f"throughput: {args.runs} runs of {args.epochs} epochs on {args.data}, medians of {args.repeats} (goal >= 1.6x)")
        print(f"  whole command: 1 worker {t['w1_s']:.1f}s, 2 workers {t['w2_s']:.1f}s -> {t['speedup']:.2f}x "
              f"(paired {t['speedup_paired']:.2f}x); 1 worker at 1 thread {t['w1t1_s']:.1f}s "
              f"(2 workers vs it {t['speedup_vs_1thread']:.2f}x)")
        print(f"  first result at: 1 worker {t['w1_first_s']:.1f}s, 2 workers {t['w2_first_s']:.1f}s, "
              f"1 worker at 1 thread {t['w1t1_first_s']:.1f}s")
        print(f"  steady state: 1 worker {t['w1_rate']:.3f} runs/s, 2 workers {t['w2_rate']:.3f} runs/s -> "
              f"{t['steady_speedup']:.2f}x (paired {t['steady_speedup_paired']:.2f}x); 1 worker at 1 thread "
              f"{t['w1t1_rate']:.3f} runs/s (2 workers vs it {t['steady_speedup_vs_1thread']:.2f}x)")
        if t["steal_max"] is not None:
            print(f"  CPU stolen by the host during a sweep: at most {t['steal_max']:.1%}")
    if args.abba:
        blocks = abba(args.runs, args.epochs, args.data, args.abba)
        med = statistics.median
        print(f"ABBA, {args.abba} blocks of 1/2/2/1 workers: whole command {med(w for w, _ in blocks):.2f}x "
              f"(range {min(w for w, _ in blocks):.2f}-{max(w for w, _ in blocks):.2f}), steady state "
              f"{med(r for _, r in blocks):.2f}x (range {min(r for _, r in blocks):.2f}-{max(r for _, r in blocks):.2f})")
    if args.part in ("overhead", "all"):
        o = overhead(args.repeats)
        print(f"overhead: PruningExperiment.run() alone {o['run_alone_s']:.2f}s (median of {args.repeats}); "
              f"tracking {o['tracking_s'] * 1000:.0f} ms = {o['tracking_pct']:.2f}% with plots, "
              f"{o['tracking_noplots_s'] * 1000:.0f} ms = {o['tracking_noplots_pct']:.2f}% with --no-plots (goal <= 2%)")
    load = os.getloadavg()
    print(f"# load after (1/5/15 min)={load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")


if __name__ == "__main__":
    main()
