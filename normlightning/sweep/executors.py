"""Running prepared sweep cells: in this process, one fresh process per cell, or as cluster jobs.

Every executor runs :func:`~normlightning.sweep.cell.run_cell` on a cell folder; a cell has run
when its ``result.json`` exists afterwards, so resuming a sweep works the same whichever
executor ran its cells.

- ``inline``: in this process (no ~10 s import per cell); ``workers > 1``: a pool of spawned
  worker processes, each running many cells;
- ``subprocess``: one fresh ``python -m normlightning.sweep --run-cell <dir>`` per cell (the
  default; ``workers > 1``: that many at once);
- ``submitit``: one job per cell through `submitit <https://github.com/facebookincubator/submitit>`_
  (the optional extra ``cluster``), on SLURM (``cluster="slurm"``: a job array) or on this
  machine (``cluster="local"``). A cell that asks for several GPUs or nodes runs as one
  multi-task SLURM job (one task per GPU), which Lightning's SLURM support turns into DDP.
  While no job finishes, a progress line every :data:`PROGRESS_EVERY_S` seconds says how many cells
  are done and in which state the others are (:func:`wait_for_jobs`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlightning.sweep.cell import run_cell
from normlightning.sweep.grid import RESULT_FILE

__all__ = ["EXECUTORS", "PROGRESS_EVERY_S", "ClusterSettings", "run_cells", "wait_for_jobs"]

EXECUTORS = ("inline", "subprocess", "submitit")
#: Seconds between progress lines while submitted jobs run and none finishes.
PROGRESS_EVERY_S = 10.0

#: Log printer: ``log(message, flush=True)``.
Log = Callable[..., None]


@dataclass(frozen=True)
class ClusterSettings:
    """Where and how large each cell's job is (``executor="submitit"``; GPUs also elsewhere).

    Attributes:
        cluster: ``"local"`` (jobs on this machine, e.g. to test) or ``"slurm"``.
        partition: SLURM partition (``None``: the cluster's default).
        time_limit_min: wall-time limit of one cell's job, in minutes.
        gpus_per_cell: GPUs of one cell over all its nodes (0: the base config's accelerator);
            ``trainer.devices = gpus_per_cell / nodes_per_cell``.
        nodes_per_cell: nodes of one cell (``trainer.num_nodes``).
        poll_s: seconds between checks of the jobs' state (default: 1 locally, 15 on SLURM).
    """

    cluster: str = "local"
    partition: str | None = None
    time_limit_min: int = 60
    gpus_per_cell: int = 0
    nodes_per_cell: int = 1
    poll_s: float | None = None

    def __post_init__(self) -> None:
        if self.cluster not in ("local", "slurm"):
            raise ValueError(f"sweep: cluster must be 'local' or 'slurm', got {self.cluster!r}")
        for name in ("time_limit_min", "nodes_per_cell"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sweep: {name} must be a positive int, got {value!r}")
        if isinstance(self.gpus_per_cell, bool) or not isinstance(self.gpus_per_cell, int) or self.gpus_per_cell < 0:
            raise ValueError(f"sweep: gpus_per_cell must be an int >= 0, got {self.gpus_per_cell!r}")
        if self.gpus_per_cell == 0 and self.nodes_per_cell > 1:
            raise ValueError("sweep: nodes_per_cell > 1 needs GPUs: set gpus_per_cell (a multiple of nodes_per_cell)")
        if self.gpus_per_cell % self.nodes_per_cell:
            raise ValueError(
                f"sweep: gpus_per_cell ({self.gpus_per_cell}) must be a multiple of nodes_per_cell "
                f"({self.nodes_per_cell}): every node of a cell runs the same number of GPUs"
            )

    @property
    def devices(self) -> int:
        """GPUs per node of a cell (``trainer.devices``)."""
        return self.gpus_per_cell // self.nodes_per_cell

    @property
    def processes(self) -> int:
        """Processes of one cell (one per GPU; 1 on CPU)."""
        return max(self.gpus_per_cell, 1)


def run_cells(
    pending: Sequence[Path],
    executor: str,
    *,
    threads: int | None,
    workers: int,
    cluster: ClusterSettings,
    jobs_dir: Path,
    log: Log,
) -> dict[str, str]:
    """Run the prepared cells ``pending``; ``{cell name: "ran" | "failed"}`` (a failure leaves
    ``error.txt`` in the cell's folder)."""
    if executor not in EXECUTORS:
        raise ValueError(f"sweep: executor must be one of {EXECUTORS}, got {executor!r}")
    if executor == "inline" and cluster.processes > 1:
        raise ValueError(
            f"sweep: a cell with {cluster.processes} GPU processes cannot run inline (DDP starts one process "
            "per GPU); use --executor subprocess or submitit"
        )
    if executor == "submitit":
        return _run_submitit(pending, threads, workers, cluster, jobs_dir, log)
    status: dict[str, str] = {}
    if workers == 1:
        for i, cell_dir in enumerate(pending, 1):
            log(f"[sweep] {i}/{len(pending)} {cell_dir.name} ...", flush=True)
            status[cell_dir.name], seconds = _attempt(cell_dir, executor, threads)
            log(f"[sweep] {cell_dir.name} {status[cell_dir.name]} in {seconds:.1f} s", flush=True)
        return status
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: fresh interpreters (no forked torch/Lightning state); each imports once and runs many cells
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_attempt, d, executor, threads): d for d in pending}
        for future in futures:
            status[futures[future].name], seconds = future.result()
            log(f"[sweep] {futures[future].name} {status[futures[future].name]} in {seconds:.1f} s", flush=True)
    return status


def _attempt(cell_dir: Path, executor: str, threads: int | None) -> tuple[str, float]:
    """Run one prepared cell; ``("ran" | "failed", seconds)``; a failure leaves ``error.txt``."""
    t0 = time.perf_counter()
    try:
        if executor == "inline":
            run_cell(cell_dir, threads=threads)
        else:
            _run_cell_subprocess(cell_dir, threads)
    except Exception:  # noqa: BLE001 - one failed cell must not stop the grid
        (cell_dir / "error.txt").write_text(traceback.format_exc())
        return "failed", time.perf_counter() - t0
    return "ran", time.perf_counter() - t0


def _run_cell_subprocess(cell_dir: Path, threads: int | None) -> None:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "normlightning.sweep", "--run-cell", str(cell_dir)]
    if threads is not None:
        command += ["--threads", str(threads)]
    with open(cell_dir / "stdout.txt", "w") as stdout:
        proc = subprocess.run(command, stdout=stdout, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0 or not (cell_dir / RESULT_FILE).is_file():
        tail = (cell_dir / "stdout.txt").read_text()[-3000:]
        raise RuntimeError(f"cell {cell_dir.name} exited with code {proc.returncode}:\n{tail}")


def import_submitit() -> Any:
    """``import submitit``, or an ``ImportError`` that names the extra to install."""
    try:
        import submitit
    except ImportError as err:
        raise ImportError(
            'sweep: --executor submitit needs submitit, which is not installed; pip install "normlightning[cluster]"'
        ) from err
    return submitit


def _job_parameters(cluster: ClusterSettings, threads: int | None, workers: int) -> dict[str, Any]:
    """submitit parameters of one cell's job: one task per GPU (Lightning's SLURM DDP) on SLURM."""
    params: dict[str, Any] = {
        "name": "normlightning-sweep",
        "timeout_min": cluster.time_limit_min,
        "nodes": cluster.nodes_per_cell,
        "tasks_per_node": cluster.devices if cluster.cluster == "slurm" and cluster.devices > 1 else 1,
        "cpus_per_task": threads or 1,
    }
    if cluster.gpus_per_cell:
        params["gpus_per_node"] = cluster.devices
    if cluster.cluster == "slurm":
        if cluster.partition:
            params["slurm_partition"] = cluster.partition
        if workers > 1:
            params["slurm_array_parallelism"] = workers
    return params


def _run_submitit(
    pending: Sequence[Path], threads: int | None, workers: int, cluster: ClusterSettings, jobs_dir: Path, log: Log
) -> dict[str, str]:
    """One submitit job per cell; wait for all of them."""
    if cluster.cluster == "local":
        if cluster.processes > 1:
            raise ValueError(
                "sweep: a cell with several GPU processes needs SLURM (--cluster slurm) or --executor subprocess; "
                "submitit's local cluster does not set up DDP"
            )
        if workers > 1:
            raise ValueError(
                "sweep: --workers does not apply to submitit's local cluster, which runs all cells at once"
            )
    if not pending:
        return {}
    submitit = import_submitit()
    executor = submitit.AutoExecutor(folder=jobs_dir, cluster=cluster.cluster)
    executor.update_parameters(**_job_parameters(cluster, threads, workers))
    jobs = {}
    with executor.batch():  # a SLURM job array: one submission for the whole grid
        for cell_dir in pending:
            jobs[cell_dir] = executor.submit(run_cell, str(cell_dir), threads)
    for cell_dir, job in jobs.items():
        log(f"[sweep] {cell_dir.name}: submitted as {cluster.cluster} job {job.job_id}", flush=True)
    status: dict[str, str] = {}
    poll = cluster.poll_s if cluster.poll_s is not None else (1.0 if cluster.cluster == "local" else 15.0)
    start = time.perf_counter()
    for done, cell_dir, job in wait_for_jobs(jobs, poll, max(PROGRESS_EVERY_S, poll), log):
        try:
            job.results()  # raises the job's exception (with its log's tail)
            if not (cell_dir / RESULT_FILE).is_file():
                raise RuntimeError(f"job {job.job_id} ended without writing {cell_dir / RESULT_FILE}")
            status[cell_dir.name] = "ran"
        except Exception as err:  # noqa: BLE001 - one failed cell must not stop the grid
            (cell_dir / "error.txt").write_text(f"submitit job {job.job_id} (logs: {job.paths.folder}):\n{err}\n")
            status[cell_dir.name] = "failed"
        log(
            f"[sweep] {done}/{len(jobs)} {cell_dir.name} {status[cell_dir.name]} "
            f"({time.perf_counter() - start:.0f} s since submission)",
            flush=True,
        )
    return status


def wait_for_jobs(
    jobs: Mapping[Path, Any], poll_s: float, progress_every_s: float, log: Log
) -> Iterator[tuple[int, Path, Any]]:
    """Yield ``(number done so far, cell folder, job)`` as each submitit job finishes (``job.done()``),
    checking every ``poll_s`` seconds. While none finishes, log a progress line every
    ``progress_every_s`` seconds: the cells done, the states of the others (``job.state``, e.g. ``2 running,
    1 pending``) and the time since the wait began."""
    waiting = dict(jobs)
    start = last_line = time.perf_counter()
    done = 0
    while waiting:
        for cell_dir in [cell_dir for cell_dir, job in waiting.items() if job.done()]:
            done += 1
            last_line = time.perf_counter()
            yield done, cell_dir, waiting.pop(cell_dir)
        if not waiting:
            return
        now = time.perf_counter()
        if now - last_line >= progress_every_s:
            states = Counter(str(job.state).lower() for job in waiting.values())
            listed = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
            log(f"[sweep] {done}/{len(jobs)} cells done; {listed} ({now - start:.0f} s since submission)", flush=True)
            last_line = now
        time.sleep(poll_s)
