"""Would everything under DIR come back from the lent GPU machine? The device tool returns at most 8 files
from $OUT, each at most 16 MiB and 64 MiB together, no more than 2 folders down ($OUT/a/b/file comes back,
$OUT/a/b/c/file does not), every file and folder named in letters, digits, '.', '_' and '-' alone
(/work/.library/device/README.md, "Limits"). Anything else is silently left behind there: this says so here.

    python3 scripts/check_returned.py DIR      exit 0: all of it would come back (the files and their sizes
                                               listed); 1: one line per violation; 2: DIR is no directory
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

MIB = 2**20
MAX_FILES = 8
MAX_FILE_BYTES = 16 * MIB
MAX_TOTAL_BYTES = 64 * MIB
MAX_FOLDERS = 2
"""Folders between DIR and a file: DIR/a/b/file is 2."""
NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Verdict:
    files: tuple[tuple[str, int], ...]
    """(path relative to DIR, bytes) of every plain file, sorted."""
    violations: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def check(root: str | Path) -> Verdict:
    """Every limit of what comes back, checked over the tree under `root` (links are not followed)."""
    root = Path(root)
    files: list[tuple[str, int]] = []
    violations: list[str] = []
    for here, dirs, names in os.walk(root):
        dirs.sort()
        base = Path(here)
        for name in sorted(dirs) + sorted(names):
            path = base / name
            rel = path.relative_to(root).as_posix()
            if not NAME.fullmatch(name):
                violations.append(f"{rel}: name {name!r} has characters other than letters, digits, . _ -")
            if path.is_symlink():
                violations.append(f"{rel}: a link (links do not come back)")
            elif name in names and not path.is_file():
                violations.append(f"{rel}: not a plain file")
            elif name in names:
                size = path.stat().st_size
                files.append((rel, size))
                folders = len(Path(rel).parts) - 1
                if folders > MAX_FOLDERS:
                    violations.append(f"{rel}: {folders} folders down (at most {MAX_FOLDERS} come back)")
                if size > MAX_FILE_BYTES:
                    violations.append(f"{rel}: {size:,} bytes (at most {MAX_FILE_BYTES:,}, 16 MiB, a file)")
    if not files:
        violations.append(f"{root}: no file to bring back")
    if len(files) > MAX_FILES:
        violations.append(f"{len(files)} files (at most {MAX_FILES} come back)")
    total = sum(size for _, size in files)
    if total > MAX_TOTAL_BYTES:
        violations.append(f"{total:,} bytes in all (at most {MAX_TOTAL_BYTES:,}, 64 MiB)")
    return Verdict(tuple(sorted(files)), tuple(violations))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("check_returned: usage: check_returned.py DIR", file=sys.stderr)
        return 2
    root = Path(argv[0])
    if not root.is_dir():
        print(f"check_returned: error: {root} is not a directory", file=sys.stderr)
        return 2
    verdict = check(root)
    for rel, size in verdict.files:
        print(f"  {size:>12,} B  {rel}")
    if verdict.ok:
        print(f"check_returned: ok: {len(verdict.files)} files, {verdict.total_bytes:,} bytes would come back")
        return 0
    for line in verdict.violations:
        print(f"check_returned: FAIL: {line}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
