"""N ranks of one measurement point: launch them, bound them in time, gather their measurements into one record.

    run_distributed(spec) -> record          # the parent side (tmath measure, tmath sweep)
    python -m harness.rank DIR               # one rank (harness.rank): reads DIR/payload.json, writes DIR/rank<R>.json

Each rank runs the single-process protocol of `harness.measure` (through the spec's trainer, e.g.
`harness.trainers.deepspeed`) on its own device and writes its outcome. The record has every rank's measurement in
`measured.ranks`, the per-term maximum over ranks in `measured.memory_bytes` (the rank that decides
whether a job fits), and the worst rank status. A rank that dies leaves a record, never a hang: the
launcher tears the others down when one fails (torch elastic's agent, DeepSpeed's launcher), the parent
kills the launcher's process group and every rank (by the pid each writes) at the time limit, and each
rank asks the kernel for SIGKILL when its launcher dies (PR_SET_PDEATHSIG), because torchrun starts
every rank in a session of its own.

Launchers: `torchrun` (torch.distributed.run: one node, static rendezvous on a free port) or `deepspeed`
(deepspeed.launcher.runner; with a hostfile, many nodes over ssh/pdsh). Both set RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which is all a rank reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from formulas.spec import RunSpec
from harness import REPO_ROOT
from harness.errors import UsageError
from harness.processes import free_port, tail, worker_env
from harness.progress import Callback, StderrReader
from harness.records import Measurement, Outcome, RankResult, Record, RunError, Status
from harness.trainers import resolve_device

LAUNCHERS: tuple[str, ...] = ("torchrun", "deepspeed")

STATUS_SEVERITY: tuple[str, ...] = ("oom", "error", "timeout", "killed", "ok")
"""Worst first: a record's status is that of its worst rank (an OOM on one rank often shows as a broken
collective, an error, on the others)."""

KILL_GRACE_S = 5.0
"""Seconds between SIGTERM to the launcher (which then stops its ranks) and SIGKILL to everything."""


def hostfile_nodes(path: str) -> list[tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed hostfile (`worker-1 slots=8`); comments and blank lines skipped."""
    nodes = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"--hostfile {path}: cannot read it ({exc.strerror or exc})") from None
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        slots = 1
        for item in rest:
            if item.startswith("slots="):
                slots = int(item.removeprefix("slots="))
        nodes.append((host, slots))
    if not nodes:
        raise UsageError(f"--hostfile {path}: no hosts in it")
    return nodes


def rank_command(rank_dir: Path) -> list[str]:
    """What each rank runs (tests replace it to simulate a rank that dies)."""
    return [sys.executable, "-m", "harness.rank", str(rank_dir)]


def launch_command(
    launcher: str, nproc_per_node: int, port: int, rank_dir: Path, hostfile: str | None = None, nodes: int = 1
) -> list[str]:
    """The launcher's command line running `rank_command` on every rank (`--no-python`: the command is whole)."""
    ranks = rank_command(rank_dir)
    if launcher == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "1", "--nproc-per-node", str(nproc_per_node),
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--no-python", *ranks,
        ]  # fmt: skip
    if launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(port)]
        if hostfile:
            cmd += ["--hostfile", hostfile, "--num_nodes", str(nodes)]
        else:
            cmd += ["--master_addr", "127.0.0.1"]
        return [*cmd, "--num_gpus", str(nproc_per_node), "--no_python", "--no_local_rank", *ranks]
    raise UsageError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")


def rank_env(spec: RunSpec, device: str) -> dict:
    """The ranks' environment: this checkout importable, DeepSpeed's CPU accelerator for CPU runs, and the
    JIT cache of compiled DeepSpeed ops (`deepspeed_shm_comm`, ~40-70 s to build) where CI caches it."""
    env = worker_env()
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".torch_extensions"))
    return env


def _kill_launch(proc: subprocess.Popen, rank_dir: Path) -> None:
    """Stop the launcher (it forwards SIGTERM to its ranks), then SIGKILL its process group and every rank."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        for pid_file in rank_dir.glob("rank*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError, OSError):
                os.kill(int(pid_file.read_text()), sig)
        if wait_s is None:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def run_distributed(
    spec: RunSpec,
    *,
    timeout: float | None = None,
    argv: list[str] | None = None,
    max_memory_bytes: int | None = None,
    launcher: str = "torchrun",
    hostfile: str | None = None,
    rank_dir: str | None = None,
    progress: Callback | None = None,
) -> Record:
    """Measure `spec` on `spec.parallel.gpus` ranks and return one record; a failed run is a record, and only a layout
    that cannot be launched (too few GPUs on this node, a bad hostfile) raises UsageError.

    `max_memory_bytes` (CPU runs) is shared: each rank's address space is capped at an N-th of it.
    `hostfile` (DeepSpeed launcher only) spreads the ranks over its nodes; `rank_dir` is where the ranks
    write their results, and must then be on a filesystem that every node shares (default: a temporary
    directory, or `results/.ranks/` under the checkout when there is a hostfile).
    """
    if launcher not in LAUNCHERS:
        raise UsageError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    device = resolve_device(spec.measurement.device)
    nodes = 1
    if hostfile:
        if launcher != "deepspeed":
            raise UsageError("--hostfile needs --launcher deepspeed (torchrun is started on each node by hand)")
        nodes = len(hostfile_nodes(hostfile))
        if spec.parallel.gpus % nodes:
            raise UsageError(f"--gpus {spec.parallel.gpus} must be a multiple of the {nodes} nodes in {hostfile}")
    elif device == "cuda":
        import torch

        if torch.cuda.device_count() < spec.parallel.gpus:
            raise UsageError(
                f"--gpus {spec.parallel.gpus}: this node has {torch.cuda.device_count()} CUDA device(s); "
                "for several nodes use --launcher deepspeed --hostfile FILE"
            )
    per_node = spec.parallel.gpus // nodes
    payload = {
        "spec": spec.to_dict(),
        "argv": argv if argv is not None else sys.argv,
        "max_memory_bytes": (max_memory_bytes // per_node) if max_memory_bytes and device == "cpu" else None,
    }
    if rank_dir is None and hostfile:
        rank_dir = str(REPO_ROOT / "results" / ".ranks")
    if rank_dir is not None:
        Path(rank_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tmath-ranks-", dir=rank_dir) as tmp:
        work = Path(tmp)
        (work / "payload.json").write_text(json.dumps(payload))
        cmd = launch_command(launcher, per_node, free_port(), work, hostfile=hostfile, nodes=nodes)
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=rank_env(spec, device),
            cwd=REPO_ROOT,
            start_new_session=True,  # the launcher's own process group, killed as one at the time limit
        )
        if progress is not None:
            progress(f"{spec.parallel.gpus} ranks started ({launcher})")
        reader = StderrReader(proc.stdout, progress)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_launch(proc, work)
            with contextlib.suppress(subprocess.TimeoutExpired):  # a rank outlived the launcher: reported below
                proc.wait(timeout=KILL_GRACE_S)
        except BaseException:
            _kill_launch(proc, work)
            raise
        output = reader.text(timeout=KILL_GRACE_S)
        if reader.still_open:  # a rank outlived its launcher and holds the pipes: stop reading
            output += "\n(output cut: a rank kept the launcher's pipes open after the kill)"
        if progress is not None:
            progress("gathering the ranks' measurements")
        ranks = [_read_rank(work, r) for r in range(spec.parallel.gpus)]
    return gather(
        spec,
        ranks,
        launcher=launcher,
        timed_out=timed_out,
        timeout=timeout,
        returncode=proc.returncode,
        stderr=output,
        elapsed_s=time.perf_counter() - t0,
    )


def _read_rank(work: Path, rank: int) -> Outcome | None:
    path = work / f"rank{rank}.json"
    if not path.exists():
        return None
    try:
        return Outcome.from_dict(json.loads(path.read_text()), f"rank {rank}")
    except (json.JSONDecodeError, ValueError):
        return None


def gather(
    spec: RunSpec,
    ranks: list[Outcome | None],
    *,
    launcher: str,
    timed_out: bool,
    timeout: float | None,
    returncode: int | None,
    stderr: str,
    elapsed_s: float,
) -> Record:
    """One record from the ranks' outcomes: every rank in `measured.ranks`, per-term maxima in
    `measured.memory_bytes`, rank 0's step time and FLOPs (a data-parallel step is synchronous), and the
    worst status. A rank without an outcome is `timeout` when the launch hit the time limit, else `killed`."""
    statuses: list[Status] = []
    per_rank: list[RankResult] = []
    errors: list[tuple[Status, RunError]] = []
    for r, result in enumerate(ranks):
        if result is None:
            status: Status = "timeout" if timed_out else "killed"
            how = (
                f"killed after the {timeout:g} s time limit"
                if timed_out
                else f"died without a result (launcher exit status {returncode})"
            )
            errors.append((status, RunError(type=status, message=f"rank {r} {how}")))
            per_rank.append(RankResult(rank=r, status=status))
        else:
            status = result.status
            if result.error is not None:
                err = result.error
                errors.append((status, dataclasses.replace(err, message=f"rank {r}: {err.message}")))
            per_rank.append(RankResult(rank=r, status=status, elapsed_s=result.elapsed_s, measured=result.measured))
        statuses.append(status)
    worst = min(statuses, key=STATUS_SEVERITY.index) if statuses else "killed"

    measured = Measurement()
    first = next(
        (m.measured for m in per_rank if m.measured is not None and m.measured.memory_bytes.weights is not None), None
    )
    if first is not None:
        measured = dataclasses.replace(first, engine=None, ranks=[])
        memory = first.memory_bytes
        for m in per_rank:
            if m.measured is not None:
                memory = memory.maxima(m.measured.memory_bytes)
        measured.memory_bytes = memory
        # The peak's phase, breakdown and timeline are those of the rank that peaked highest (the one to OOM).
        measuring = [
            m.measured for m in per_rank if m.measured is not None and m.measured.memory_bytes.weights is not None
        ]
        top = max(measuring, key=lambda m: m.memory_bytes.peak_allocated or 0)
        measured.peak_phase, measured.peak_breakdown = top.peak_phase, top.peak_breakdown
        measured.timeline = top.timeline
        measured.methods = {
            **first.methods,
            "memory_bytes": "per-term maximum over ranks; measured.ranks[i].measured.memory_bytes holds rank i's own",
            "peak_phase": "the phase, breakdown and timeline of the rank with the highest peak",
            "step_ms": "rank 0's (a data-parallel step ends with every rank)",
        }
    measured.ranks = per_rank
    measured.world_size = len(ranks)
    measured.launcher = launcher

    error = None
    if worst != "ok":
        chosen = next((e for s, e in errors if s == worst), errors[0][1] if errors else RunError(worst, ""))
        error = dataclasses.replace(chosen, stderr_tail=tail(stderr))
        if len(errors) > 1:
            error.ranks = [e.message[:300] for _, e in errors]
    environment = next((r.environment for r in ranks if r is not None and r.environment is not None), None)
    outcome = Outcome(status=worst, measured=measured, error=error, environment=environment, elapsed_s=elapsed_s)
    return Record.make(spec, outcome)
