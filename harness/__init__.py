"""The harness: everything that measures (torch, CUDA, NVML, DeepSpeed, subprocesses). See the README's
development section for its layers."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout the harness runs from: children import its packages, ranks write beside it."""
