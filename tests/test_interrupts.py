"""Ctrl-C on `benchkit sweep --workers 2` always stops it, whenever it lands.

The race behind a sweep that hung past 120 s after one Ctrl-C: the pool's runs are a generator, and a
Ctrl-C that reaches the sweep while it handles an outcome (prints its line, updates the bar) is raised
outside that generator. Python then closes the generator, whose cleanup waited for the workers to finish
their runs (``join()`` without a limit) before the sweep could ask them to stop. Now closing the
generator stops the runs in flight first, every wait is bounded, and a second Ctrl-C hurries the stop
instead of leaving workers unwatched.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from benchkit.executors import STOP_GRACE_S, ProcessPoolRunner
from benchkit.jobs import RunOutcome, RunTask
from benchkit.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]


def nap(task: RunTask) -> RunOutcome:
    """A run for a pool worker (pickled by reference: the worker imports this module): task 0 returns at
    once, the others sleep ``seconds`` unless stopped, as run_tracked would be."""
    if task.index == 0:
        return RunOutcome(task.index, task.config_hash, "finished")
    try:
        time.sleep(task.config["seconds"])
    except KeyboardInterrupt as e:
        return RunOutcome(task.index, task.config_hash, "killed", error=str(e))
    return RunOutcome(task.index, task.config_hash, "finished")


def test_ctrl_c_while_the_sweep_handles_an_outcome_stops_the_runs_in_flight():
    """The race itself, deterministically: the interrupt is raised in the loop that consumes the pool's
    outcomes, while the second worker is 120 s into its run. That run must be stopped (killed), not
    waited for."""
    tasks = [RunTask(i, {"seconds": 120}, f"h{i}", f"r{i}", {}, "0", "sqlite:///unused.db", "s") for i in range(2)]
    ex = ProcessPoolRunner(2, threads=1)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        for outcome in ex.run(nap, tasks):
            assert outcome.index == 0
            time.sleep(1.0)  # the other worker is well into its nap
            raise KeyboardInterrupt  # Ctrl-C while the sweep prints the first outcome's line
    stopped = ex.interrupted_outcomes()
    assert [(o.index, o.status, o.error) for o in stopped] == [(1, "killed", "interrupted (Ctrl-C / SIGINT)")]
    assert time.monotonic() - t0 < 100  # (it ran to the end of its 120 s nap before)


class _CtrlCAfterFirstTask:
    """A worker's pipe that delivers a real SIGINT to the sweep right after the first task is written:
    the moment between handing a worker its task and noting which task it has (seen once in CI, under
    load: the run went on unwatched, was killed by the shutdown and left RUNNING in the store)."""

    fired = False

    def __init__(self, conn):
        self._conn = conn

    def send(self, obj):
        self._conn.send(obj)
        if isinstance(obj, RunTask) and not _CtrlCAfterFirstTask.fired:
            _CtrlCAfterFirstTask.fired = True
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, before send returns

    def __getattr__(self, name):
        return getattr(self._conn, name)


class _Runner(ProcessPoolRunner):
    def _spawn(self):
        w = super()._spawn()
        w.conn = _CtrlCAfterFirstTask(w.conn)
        return w


def test_a_stop_during_a_store_call_lands_after_the_call_returns():
    """A Ctrl-C inside a tracking-store call (here: a fake write that receives the signal half-way) must not
    cut it short: cut inside SQLAlchemy's commit or rollback, the sqlite connection kept the store's write
    lock and every later write waited on it, both workers' KILLED marks included (the stress test's grace
    kill). The call finishes; the interrupt is raised right after, with its reason."""
    from benchkit.executors import _stop_signals
    from benchkit.jobs import INTERRUPT_HANDLED, SIGINT_REASON, Interrupted
    from benchkit.tracking import with_retry

    done: list[str] = []

    def write() -> str:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs during this sleep, inside the call
        done.append("committed")
        return "ok"

    with _stop_signals():
        with pytest.raises(Interrupted) as caught:
            with_retry(write)
        assert done == ["committed"] and str(caught.value) == SIGINT_REASON
        # while a run marks itself KILLED, stop requests are ignored: none is held and raised afterwards
        INTERRUPT_HANDLED.set()
        try:
            assert with_retry(write) == "ok" and done == ["committed"] * 2
        finally:
            INTERRUPT_HANDLED.clear()


def test_ctrl_c_between_handing_out_a_task_and_noting_it_still_stops_that_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # where a worker stopped before its run began is looked up
    tasks = [RunTask(i, {"seconds": 120}, f"h{i}", f"r{i}", {}, "0", uri, "s") for i in (1, 2)]
    ex = _Runner(2, threads=1)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        for _ in ex.run(nap, tasks):
            pass
    stopped = ex.interrupted_outcomes()
    # killed (it was running) or skipped (the stop reached the fresh worker before the task): reported either way
    assert [(o.index, o.status, o.error) for o in stopped] in ([(1, "killed", "interrupted (Ctrl-C / SIGINT)")],
                                                               [(1, "skipped", "sweep interrupted")])
    assert time.monotonic() - t0 < 25  # the run was told to stop, not killed by the shutdown 10 s later


STUCK_SWEEP = """
import os, signal, sys, threading, time
from benchkit import executors
from benchkit.executors import STOP_GRACE_S, ProcessPoolRunner
from benchkit.jobs import RunOutcome, RunTask


def stubborn(task):  # swallows every stop request, as a worker stuck in C code or a lock would
    open("started", "w").close()
    end = time.monotonic() + task.config["seconds"]
    while time.monotonic() < end:
        try:
            time.sleep(0.1)
        except KeyboardInterrupt:
            pass
    return RunOutcome(task.index, task.config_hash, "finished")


if __name__ == "__main__":
    executors.STOP_GRACE_S = 2.0
    ex = ProcessPoolRunner(1, threads=1)
    tasks = [RunTask(1, {"seconds": 120}, "h1", "r1", {}, "0", sys.argv[1], "s")]
    def ctrl_c_once_it_runs():
        while not os.path.exists("started"):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_it_runs, daemon=True).start()
    try:
        for _ in ex.run(stubborn, tasks):
            pass
    except KeyboardInterrupt:
        pass
    for o in ex.interrupted_outcomes():
        print("OUTCOME", o.index, o.status, o.error)
"""


def test_a_worker_that_does_not_stop_in_time_prints_where_it_is_stuck_and_is_killed(tmp_path):
    """A worker stuck past the stop's grace period (here 2 s) is killed and its run marked KILLED from the
    sweep, as before; first it prints its threads' stacks, so the output says where it was stuck. (In a
    process of its own: workers write to the stderr their fork server started with.)"""
    (tmp_path / "stuck_sweep.py").write_text(STUCK_SWEEP)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "stuck_sweep.py", f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(tmp_path)]))})
    assert time.monotonic() - t0 < 90, r.stderr[-3000:]
    assert "OUTCOME 1 killed worker process" in r.stdout and "did not stop within 2 s" in r.stdout, r.stderr[-3000:]
    assert "did not stop within 2 s; its stacks:" in r.stderr
    assert 'in stubborn' in r.stderr and "stuck_sweep.py" in r.stderr, r.stderr[-3000:]  # faulthandler's dump


# --------------------------------------------------------------------------------------------- the stress test
def _sweep(tmp_path: Path, name: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""\
        experiment: {name}
        base:
          data: {{name: synthetic, num_samples: 256, input_shape: [1, 8, 8]}}
          model: {{name: lenet300}}
          train: {{epochs: 30, batch_size: 32}}
          prune: {{timing: pre, compression: 2}}
          output_dir: {tmp_path / 'runs'}
        grid:
          seed: {list(range(40))}
        """))
    return p


def _runs(tracker: Tracker, experiment: str) -> list:
    exp = tracker.client.get_experiment_by_name(experiment)
    return tracker.client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.slow
def test_repeated_ctrl_c_under_cpu_load_always_stops_the_sweep(tmp_path):
    """Round after round, under full CPU load (one busy loop per core), a sweep with two workers is
    interrupted at a random moment — while runs are starting, in flight, or being reported — once or
    twice in a row, and once by SIGTERM. Every time it exits with 130 (143 for SIGTERM) within the
    communicate() timeout, leaves no RUNNING run and no worker process, and names the reason on every
    KILLED run. ``BENCHKIT_STRESS_ROUNDS`` sets the number of rounds (default 8)."""
    rounds = int(os.environ.get("BENCHKIT_STRESS_ROUNDS", "8"))
    rng = random.Random(int(os.environ.get("BENCHKIT_STRESS_SEED", "0")))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "CI": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    tracker = None
    try:
        for r in range(rounds + 1):
            sigterm = r == rounds
            name = f"stress-{r}"
            proc = subprocess.Popen([sys.executable, "-m", "benchkit.cli", "sweep", str(_sweep(tmp_path, name)),
                                     "--workers", "2", "--tracking-uri", uri, "--no-plots"], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                wait_for = rng.choice([0, 1, 3])  # runs finished first (0: as soon as one is RUNNING)
                deadline = time.time() + 300
                while time.time() < deadline and proc.poll() is None:
                    time.sleep(0.2)
                    if tracker is None and (tmp_path / "mlflow.db").exists():
                        tracker = Tracker(uri)  # (waits while the first sweep creates the store)
                    runs = _runs(tracker, name) if tracker is not None else []
                    finished = sum(x.info.status == "FINISHED" for x in runs)
                    if finished >= wait_for and any(x.info.status == "RUNNING" for x in runs):
                        break
                time.sleep(rng.uniform(0, 1.0))
                if proc.poll() is not None:
                    pytest.fail(f"round {r}: the sweep ended before it was interrupted:\n{proc.communicate()[0]}")
                if sigterm:
                    proc.send_signal(signal.SIGTERM)  # a scheduler, `timeout`, `kill`: the sweep process only
                else:
                    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the process group
                    if rng.random() < 0.5:  # and an impatient second one
                        time.sleep(rng.uniform(0.05, 1.5))
                        if proc.poll() is None:
                            os.killpg(proc.pid, signal.SIGINT)
                out, _ = proc.communicate(timeout=120)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            reason = "terminated (SIGTERM)" if sigterm else "interrupted (Ctrl-C / SIGINT)"
            assert proc.returncode == (143 if sigterm else 130), f"round {r}:\n{out}"
            assert f"{reason}: the run(s) in flight are marked KILLED" in out, f"round {r}:\n{out}"
            assert "Traceback" not in out, f"round {r}:\n{out}"
            tracker = tracker or Tracker(uri)
            runs = _runs(tracker, name)
            left = [(x.info.run_id, x.info.start_time, x.data.tags) for x in runs if x.info.status == "RUNNING"]
            assert not left, f"round {r}: left RUNNING {left}\n--- the sweep printed:\n{out}"
            killed = [x for x in runs if x.info.status == "KILLED"]
            # Was rare (3 runs of this test in about 45): both workers stuck in fail_run's INSERT on the store's
            # write lock for the whole grace period, the lock held by a connection that a stop had cut inside
            # SQLAlchemy's commit or rollback. Store calls now hold a stop until they return (jobs.hold_interrupts,
            # test_a_stop_during_a_store_call_lands_after_the_call_returns); 35 runs since, none took this path.
            # Still accepted, as the sweep's own answer to a stuck worker: it kills it and marks the run KILLED
            # itself, with the stop's reason inside its own.
            grace = f"did not stop within {STOP_GRACE_S:g} s of the sweep's stop request ({reason})"
            if not all(x.data.tags.get("benchkit.error") == reason or
                       "was killed: the sweep was interrupted again" in x.data.tags.get("benchkit.error", "") or
                       grace in x.data.tags.get("benchkit.error", "")
                       for x in killed):
                pytest.fail(f"round {r}: {[x.data.tags.get('benchkit.error') for x in killed]}\n"
                            f"--- the sweep printed:\n{out}", pytrace=False)
            pids = {int(x.data.tags["benchkit.pid"]) for x in runs}
            time.sleep(0.5)
            assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"], r
    finally:
        for b in burners:
            b.kill()


def test_a_stop_swallowed_by_a_finaliser_is_not_printed_but_other_errors_are(capsys):
    """A worker's stop signal can land in a finaliser (SQLAlchemy's weakref cleanup did, under load);
    Python then prints "Exception ignored ... Traceback" though the next repeat stops the run. The
    worker's hook drops exactly that case and reports any other unraisable error as Python would."""
    from benchkit.executors import _drop_swallowed_stop
    from benchkit.jobs import Interrupted

    class Finalised:
        def __init__(self, exc: BaseException):
            self.exc = exc

        def __del__(self):
            raise self.exc

    previous = sys.unraisablehook
    sys.unraisablehook = _drop_swallowed_stop
    try:
        Finalised(Interrupted("interrupted (Ctrl-C)"))  # dropped at once: CPython runs __del__ here
        assert capsys.readouterr().err == ""
        Finalised(ValueError("a real bug in a finaliser"))
        err = capsys.readouterr().err
    finally:
        sys.unraisablehook = previous
    assert "Exception ignored" in err and "ValueError: a real bug in a finaliser" in err
