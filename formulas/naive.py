"""The Q&A seed's formula, kept as the naive baseline so reports show how far off it is.

Source: the Stack Exchange answer to "roughly estimate the memory requirement of training an arbitrary
Transformer model" (the project's Q&A seed), which derives M ≈ M_activations ≈ B·T²/(4·N·D²) for GPT. With
C = N·D (N heads of width D), L layers, batch B and T tokens, it counts per block query, key,
value and an MLP of width C (3C² + C²), ignores norms, biases, embeddings and optimizer state,
and stores B·N·T² attention scores plus two B·N·T·D outputs per block:

    M = M_model + M_activations + M_gradients,  M_model = M_gradients = 4·L·C²,
    M_activations = B·N·L·T·(T + 2D)   (elements)

Its first comment corrects the MLP to width 4C, the de facto standard: the MLP matrix becomes
C×4C (3C² + 4C² = 7C² per block) and its output 4·B·N·T·D, so activations are B·N·L·T·(T + 5D).
Elements become bytes at the precision's weight size.
"""

from __future__ import annotations

from formulas.architecture import Architecture
from formulas.memory import ModelStates

NAIVE_METHODS: tuple[str, ...] = ("naive", "naive-mlp4c")


def naive_params(arch: Architecture, mlp4c: bool = False) -> int:
    """4·L·C² (the answer), 7·L·C² with the comment's MLP of width 4C."""
    return (7 if mlp4c else 4) * arch.n_layers * arch.hidden**2


def naive_activation_elements(arch: Architecture, seq: int, batch: int, mlp4c: bool = False) -> int:
    """B·N·L·T·(T + 2D) (the answer); B·N·L·T·(T + 5D) with the MLP of width 4C."""
    width = 5 if mlp4c else 2
    return batch * arch.n_heads * arch.n_layers * seq * (seq + width * arch.head_size)


def naive_memory(arch: Architecture, seq: int, batch: int, bytes_per_element: int, mlp4c: bool = False):
    """(model states, activation bytes) of the naive formula: no optimizer state, gradients = model."""
    model = bytes_per_element * naive_params(arch, mlp4c)
    states = ModelStates(weights=model, gradients=model, optimizer=0)
    return states, bytes_per_element * naive_activation_elements(arch, seq, batch, mlp4c)
