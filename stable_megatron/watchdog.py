"""The step watchdog: a run that stops making progress ends instead of hanging.

A daemon thread on every rank writes a heartbeat (`<run_dir>/.heartbeat/rank<r>`: its pid and,
by its modification time, that the process is alive) every `poll` seconds and checks that the
main thread made progress recently: a step completed, or a phase (start-up, a checkpoint save,
an evaluation) began. The bound for a step is `factor` times the slowest of the run's recent
step times, and never less than `floor`; outside steps it is `floor`. When the bound passes,
the rank writes every thread's Python stack (faulthandler) to
`<run_dir>/stacks/rank<r>.txt`, prints one line naming the stalled step and the ranks whose
heartbeat went stale (a process that was stopped, or died without the launcher noticing), and
exits the process with `EXIT_STALLED` (the main thread may be blocked in a collective that
would otherwise wait for `parallel.timeout_minutes`). The thread of a stopped process stops
with it, so the other ranks name it.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

EXIT_STALLED = 4  # the process exit code of a stalled run: a relaunch may fix it
HEARTBEAT_DIR = ".heartbeat"
STACKS_DIR = "stacks"


class StepWatchdog:
    def __init__(self, run_dir: str | os.PathLike, rank: int, world: int, factor: float,
                 floor: float, poll: float = 1.0, exit_process: bool = True) -> None:
        self.run_dir, self.rank, self.world = Path(run_dir), rank, world
        self.factor, self.floor, self.poll = factor, floor, poll
        self.exit_process = exit_process
        self.step_times: collections.deque[float] = collections.deque(maxlen=20)
        self.step = 0  # the step being taken (the last completed + 1)
        self.phase = "start-up"
        self.last_progress = time.monotonic()
        self.fired: str | None = None  # the line, once fired
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heartbeat = self.run_dir / HEARTBEAT_DIR / f"rank{rank}"

    # ---------------------------------------------------------------- the main thread's side

    def start(self) -> StepWatchdog:
        self._heartbeat.parent.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._run, name="stable_megatron-watchdog",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll)

    def step_done(self, step: int, seconds: float) -> None:
        """Step `step` completed in `seconds`; the next one is being taken."""
        self.step_times.append(seconds)
        self.step, self.phase = step + 1, "step"
        self.last_progress = time.monotonic()

    @contextlib.contextmanager
    def during(self, phase: str):
        """A phase other than a step (a save, an evaluation): bounded by `floor`."""
        previous, self.phase = self.phase, phase
        self.last_progress = time.monotonic()
        try:
            yield
        finally:
            self.phase = previous
            self.last_progress = time.monotonic()

    # ---------------------------------------------------------------- the thread

    def bound(self) -> float:
        if self.phase != "step" or not self.step_times:
            return self.floor
        return max(self.floor, self.factor * max(self.step_times))

    def _beat(self) -> None:
        try:
            self._heartbeat.write_text(f"{os.getpid()}\n")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self._beat()
            waited = time.monotonic() - self.last_progress
            bound = self.bound()
            if waited > bound:
                self._fire(waited, bound)
                return

    def stale_ranks(self) -> list[tuple[int, float]]:
        """(rank, seconds since its heartbeat) of the ranks whose heartbeat is older than
        three polls (this one's is fresh)."""
        now, out = time.time(), []
        for rank in range(self.world):
            try:
                age = now - (self._heartbeat.parent / f"rank{rank}").stat().st_mtime
            except OSError:
                age = float("inf")
            if age > 3 * self.poll + 1:
                out.append((rank, age))
        return out

    def _fire(self, waited: float, bound: float) -> None:
        stacks = self.run_dir / STACKS_DIR / f"rank{self.rank}.txt"
        try:
            stacks.parent.mkdir(parents=True, exist_ok=True)
            with open(stacks, "w") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            stacks = None
        what = (f"step {self.step} did not complete" if self.phase == "step"
                else f"{self.phase} at step {self.step} did not finish")
        stale = self.stale_ranks()
        who = ("; no heartbeat from rank " + ", ".join(f"{r} for {age:.0f} s" for r, age in stale)
               if stale else "; every rank's heartbeat is alive (a deadlock, or a rank busy)")
        self.fired = (f"watchdog (rank {self.rank}): {what} within {bound:.0f} s (waited "
                      f"{waited:.0f} s){who}; Python stacks in "
                      f"{stacks if stacks is not None else 'nowhere (unwritable run dir)'}")
        print(f"error: {self.fired}", file=sys.stderr, flush=True)
        if self.exit_process:
            os._exit(EXIT_STALLED)
