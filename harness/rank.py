"""One rank of a multi-rank measurement, started by a launcher (torchrun, deepspeed) from `harness.distributed`.

    python -m harness.rank DIR   # reads DIR/payload.json, writes DIR/rank<R>.json (its Outcome) and DIR/rank<R>.pid

The rank runs the single-process protocol of `harness.measure` on its own device and writes its outcome
only: the parent's `gather` makes the one record (and its prediction) from all ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from harness.processes import die_with_parent
from harness.worker import measure_payload, write_atomically


def rank_main(rank_dir: str) -> int:
    """Measure and write rank<R>.json, whatever happens."""
    die_with_parent()  # torchrun starts each rank in a session of its own: die with the launcher
    if os.getppid() == 1:  # the launcher died before the request took effect
        return 137
    work = Path(rank_dir)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    (work / f"rank{rank}.pid").write_text(str(os.getpid()))
    payload = json.loads((work / "payload.json").read_text())

    def before(spec):
        if spec.measurement.device in ("cuda", "auto") and torch.cuda.is_available():
            torch.cuda.set_device(local_rank)  # "cuda" is then this rank's GPU for every allocation

    _, outcome = measure_payload(payload, before_measure=before, with_environment=rank == 0, label=f"rank {rank}")
    write_atomically(work / f"rank{rank}.json", outcome.to_dict())
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2:
        return rank_main(argv[1])
    print("usage: python -m harness.rank DIR  (run by a launcher; see harness.distributed)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
