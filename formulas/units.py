"""Byte units: binary, as nvidia-smi and `torch.cuda.memory_summary` print them. Integers until display."""

KIB = 2**10
MIB = 2**20
GIB = 2**30


def ceil_div(x: int, y: int) -> int:
    """⌈x / y⌉ for integers (and NumPy integer arrays): what a split into y parts holds at most."""
    return -(-x // y)
