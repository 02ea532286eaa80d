"""Byte units: binary, as nvidia-smi and `torch.cuda.memory_summary` print them. Integers until display."""

KIB = 2**10
MIB = 2**20
GIB = 2**30
