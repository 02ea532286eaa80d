"""A CPU stand-in for a GPU sweep file, for the dry run of scripts/device-check.sh.

    python3 scripts/dry_sweep.py SWEEP.yaml OUT.yaml [--points N]

keeps the first N points of SWEEP.yaml (its priority order: default 2) with every setting that makes them
what they are (model family, precision, attention, recompute, impl, ZeRO stage, offload), and shrinks what
makes them slow on a CPU: 2 layers of width 64, vocabulary 256, s = 64, b = 2, device cpu, 2 steps after 1
warm-up. The same name, so its results directory and reports look like the real sweep's. Explicit points
only (the GPU sweep files have no grid). Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

TINY = {
    "layers": 2,
    "hidden": 64,
    "heads": 2,
    "ffn_hidden": 256,
    "vocab": 256,
    "seq": 64,
    "batch": 2,
    "device": "cpu",
    "steps": 2,
    "warmup": 1,
}
TIMEOUT_S = 120


def shrink(data: dict, n: int, source: str) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("points"), list) or not data["points"]:
        raise ValueError(f"{source}: needs a non-empty points: list")
    if data.get("grid"):
        raise ValueError(f"{source}: has a grid; the GPU sweep files are explicit points in priority order")
    points = []
    for i, point in enumerate(data["points"][:n]):
        if not isinstance(point, dict):
            raise ValueError(f"{source}: points[{i}] is not a mapping")
        points.append({**point, **TINY})
    return {
        "name": data.get("name") or Path(source).stem,
        "description": f"dry run of {source}: its first {len(points)} points, shrunk to run on a CPU",
        "defaults": {**(data.get("defaults") or {}), **TINY},
        "points": points,
        "timeout": TIMEOUT_S,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", metavar="SWEEP.yaml")
    parser.add_argument("out", metavar="OUT.yaml")
    parser.add_argument("--points", type=int, default=2, metavar="N", help="how many points to keep (default 2)")
    args = parser.parse_args(argv)
    try:
        if args.points < 1:
            raise ValueError(f"--points must be positive, got {args.points}")
        data = yaml.safe_load(Path(args.sweep).read_text(encoding="utf-8"))
        tiny = shrink(data, args.points, args.sweep)
        Path(args.out).write_text(yaml.safe_dump(tiny, sort_keys=False), encoding="utf-8")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"dry_sweep: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"dry_sweep: {args.out}: {len(tiny['points'])} points of {args.sweep} on the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
