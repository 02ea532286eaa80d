"""Fake-tensor ranks of a parallel layout beside `formulas.ranks`' walk of the same ranks.

    .venv/bin/python scripts/fake_ranks_walk.py OUT.json --ranks 0,2 [--what TEXT] KEY=VALUE ...

Each rank runs in its own process (`harness.plan.verify.run_fake_rank`: torch's fake process group, device
meta), as `tmath plan --verify` runs them; the walk is `formulas.ranks.parallel_prediction` on the same spec.
Writes the settings, each rank's measured memory, the walk's peak and basis, and the commit. For example
(results/plan/fake-tp2-pp2-fsdp2-gpt2-4l.json):

    .venv/bin/python scripts/fake_ranks_walk.py results/plan/fake-tp2-pp2-fsdp2-gpt2-4l.json --ranks 0,2 \\
        model=gpt2 layers=4 seq=64 batch=2 pp=2 tp=2 dp_shard=fsdp2 microbatches=4 gpus=8 \\
        precision=bf16-mixed device=meta steps=0 warmup=0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from formulas.ranks import parallel_prediction
from harness.environment import git_commit
from harness.plan.verify import run_fake_rank
from harness.specbuild import build_spec


def _value(text: str):
    try:
        return int(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", metavar="OUT.json")
    parser.add_argument("--ranks", default="0", help="comma-separated ranks to run (default 0)")
    parser.add_argument("--what", default="", help="a sentence saying what the file is")
    parser.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if any("=" not in s for s in args.settings):
        print("fake_ranks_walk: error: settings are KEY=VALUE", file=sys.stderr)
        return 2
    settings = {k: _value(v) for k, v in (s.split("=", 1) for s in args.settings)}
    spec = build_spec(settings)
    walks = {r.rank: r for r in parallel_prediction(spec, "meta").ranks}
    ranks = []
    for rank in (int(r) for r in args.ranks.split(",")):
        measured = run_fake_rank(spec, rank, timeout=600)
        if "error" in measured:
            print(f"fake_ranks_walk: error: rank {rank}: {measured['error']}", file=sys.stderr)
            return 2
        walk = walks[rank]
        peak = measured["memory_bytes"]["peak_allocated"]
        ranks.append({"rank": rank, "coords": walk.coords, "measured": measured, "walk_peak": walk.peak,
                      "walk_basis": walk.peak_basis, "walk_vs_measured": walk.peak / peak - 1})  # fmt: skip
        print(f"rank {rank}: fake {peak:,} B, walk {walk.peak:,} B ({walk.peak / peak - 1:+.1%})")
    commit = git_commit() or ""
    record = {"what": args.what, "settings": settings, "ranks": ranks, "git_commit": commit.removesuffix("-dirty"),
              "dirty": commit.endswith("-dirty")}  # fmt: skip
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
