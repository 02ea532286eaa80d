"""Compute: FLOPs per token and per step, training cost, time, and utilisation.

Sources:
- Transformer Math 101, "Compute Requirements": C = τT ≈ 6PD, with C_forward ≈ 2PD and
  C_backward ≈ 4PD; units FLOP, GPU-hours and PetaFLOP-days; Chinchilla D = 20P; with
  activation recomputation the forward pass is bounded by one more forward (8PD).
- Attention term: Narayanan et al. 2021 (arXiv:2104.04473, Appendix) and PaLM (Chowdhery et
  al. 2022, Appendix B): the Q·Kᵀ and scores·V products add 2·2·s·h FLOPs per token and layer
  in the forward pass, 12·L·h·s per token for forward + backward.

Causal convention: we count the full s×s score matrix, as Megatron-LM, PaLM's MFU and
`torch.utils.flop_counter` do. Kernels that skip the masked half (FlashAttention's causal mode)
do half of that work; the FlashAttention papers' TFLOP/s count only the unmasked half.
"""

from __future__ import annotations

from dataclasses import dataclass

from formulas.architecture import Architecture
from formulas.params import blocks_matmul_params, matmul_params, sequence_matmul_params

SECONDS_PER_DAY = 86_400
PFLOP = 10**15
CHINCHILLA_TOKENS_PER_PARAM = 20


def attention_flops_per_token(arch: Architecture, seq: int) -> int:
    """Forward FLOPs per token of Q·Kᵀ and scores·V over all layers: 4·L·s·h (full s×s matrix), with h the
    attention's width a·d (= h unless the head size is set apart). Under multi-head latent attention Q·Kᵀ is
    a·(d_h + d_h^R) wide and scores·V a·d_v (DeepSeek-V2, §2.1)."""
    if arch.mla:
        a = arch.n_heads
        return 2 * arch.n_layers * seq * a * (arch.qk_nope_head_dim + arch.qk_rope_head_dim + arch.v_head_dim)
    return 4 * arch.n_layers * seq * arch.q_width


def forward_flops_per_token(params: int, arch: Architecture | None = None, seq: int = 0) -> int:
    """2P (Transformer Math 101: C_forward ≈ 2PD) plus the attention term when the shape is known."""
    return 2 * params + (attention_flops_per_token(arch, seq) if arch is not None else 0)


def training_flops_per_token(params: int, arch: Architecture | None = None, seq: int = 0) -> int:
    """Model FLOPs per trained token: forward + backward = 3 × forward = 6P + 12·L·s·h."""
    return 3 * forward_flops_per_token(params, arch, seq)


def recompute_flops_per_token(params: int, recompute: str, arch: Architecture | None = None, seq: int = 0) -> int:
    """Extra forward work per token that activation recomputation spends.

    full: one more forward pass (Transformer Math 101: bounded by a full forward, 8PD in all).
    selective: only the attention core (Q·Kᵀ, softmax, scores·V) is recomputed, 4·L·s·h
    (Korthikanti et al. 2022, Section 5).
    """
    if recompute == "full":
        return forward_flops_per_token(params, arch, seq)
    if recompute == "selective":
        return attention_flops_per_token(arch, seq) if arch is not None else 0
    return 0


def replayed_block_matmul_params(arch: Architecture) -> int:
    """The matmul parameters whose products full recompute replays under torch's non-reentrant checkpoint of
    each block: every block's, less, in a pre-LN decoder without dropout, each dense MLP's output projection.
    The checkpoint stops early once every saved tensor is rebuilt (`set_checkpoint_early_stop`, on by default
    since PyTorch 2.1, pytorch/pytorch#96866); the projection's input is saved before it runs and the residual
    add after it saves nothing, so the projection itself is not replayed. With dropout after it, its mask is
    saved and the whole block is replayed (in a MoE layer the experts' outputs are combined after it:
    replayed in full here, not measured). The embedding and the output layer are outside the blocks: never."""
    block_matmul = blocks_matmul_params(arch)
    if arch.dropout == 0 and arch.family == "decoder":
        block_matmul -= (arch.n_layers - arch.moe_layers) * arch.ffn_hidden * arch.hidden
    return block_matmul


def full_recompute_flops_per_token(arch: Architecture, seq: int) -> int:
    """Forward FLOPs per token that full recompute replays in the backward: the replayed blocks' matmuls
    (`replayed_block_matmul_params`) and the attention core, as `torch.utils.flop_counter` counts them."""
    return 2 * replayed_block_matmul_params(arch) + attention_flops_per_token(arch, seq)


def matmul_flops_per_step(arch: Architecture, batch: int, seq: int, recompute: str = "none") -> int:
    """Exactly the FLOPs `torch.utils.flop_counter.FlopCounterMode` counts for one training step.

    Forward: 2 FLOPs per matmul parameter per token (per sequence for BERT's pooler and NSP head)
    plus attention, 4·s·h per token and layer (Q·Kᵀ and scores·V, each 2·b·s²·h, full matrix).
    Backward computes the gradient of both operands of every matmul: twice the forward.

    Recomputation replays, in the backward pass, the forward work up to the last tensor the
    backward needs: torch's non-reentrant checkpoint stops early once every saved tensor is
    rebuilt (`torch.utils.checkpoint.set_checkpoint_early_stop`, on by default). Selective
    recompute therefore replays Q·Kᵀ but not scores·V (its output is saved outside the region);
    full recompute replays each block but, in a pre-LN block without dropout, its last matmul.
    """
    tokens = batch * seq
    attention = attention_flops_per_token(arch, seq) * tokens
    forward = 2 * matmul_params(arch) * tokens + 2 * sequence_matmul_params(arch) * batch + attention
    if recompute == "full":
        extra = full_recompute_flops_per_token(arch, seq) * tokens
    elif recompute == "selective":
        extra = attention // 2  # Q·Kᵀ only
    else:
        extra = 0
    return 3 * forward + extra


@dataclass(frozen=True)
class TrainingCost:
    """Cost of training on a token budget (Transformer Math 101, "Compute Requirements")."""

    tokens: int
    """D: tokens trained on."""
    flops: int
    """C = 6·P·D."""
    gpus: int
    tflops_per_gpu: float
    """Achieved (not peak) TFLOP/s per GPU."""

    @property
    def seconds(self) -> float:
        """T = C / τ with τ = GPUs × achieved FLOP/s."""
        return self.flops / (self.gpus * self.tflops_per_gpu * 1e12)

    @property
    def days(self) -> float:
        return self.seconds / SECONDS_PER_DAY

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus / 3600

    @property
    def pf_days(self) -> float:
        """PetaFLOP-days: C / (10¹⁵ FLOP/s × 86 400 s)."""
        return self.flops / (PFLOP * SECONDS_PER_DAY)


def training_cost(params: int, tokens: int, gpus: int, tflops_per_gpu: float) -> TrainingCost:
    if tflops_per_gpu <= 0:
        raise ValueError(f"achieved TFLOP/s per GPU must be positive, got {tflops_per_gpu!r}")
    return TrainingCost(tokens=tokens, flops=6 * params * tokens, gpus=gpus, tflops_per_gpu=tflops_per_gpu)


def chinchilla_tokens(params: int) -> int:
    """Compute-optimal token count D = 20·P (Hoffmann et al. 2022, as Transformer Math 101 states it)."""
    return CHINCHILLA_TOKENS_PER_PARAM * params


def mfu(model_flops_per_second: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's dense peak (PaLM, Appendix B)."""
    return model_flops_per_second / (peak_tflops * 1e12)
