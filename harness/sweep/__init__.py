"""Sweeps: a YAML grid of settings, every point measured in processes of its own, one record per point.

    tmath sweep sweeps/cpu-smoke.yaml                  # results/cpu-smoke/runs.jsonl
    tmath sweep sweeps/cpu-smoke.yaml --resume         # continue an interrupted sweep
    tmath sweep sweeps/a100-node.yaml --executor slurm --slurm-partition gpu

By role:
- `file`: the sweep-file schema (pydantic, from the settings of `formulas.spec`) and its expansion into
  validated points, all checked before anything runs;
- `run`: the sweep itself (pending points, resume, the lock, progress, one fsynced record per point);
- `local` and `slurm`: the executors, here one point at a time, or one Slurm job per point (submitit).
"""
