"""Fine-tuning memory: LoRA and QLoRA adapters on a frozen base, term by term.

Sources:
- Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685), §4.1: a frozen
  W₀ (d × k) plus a trainable B·A with A (r × k) and B (d × r), so r·(d + k) trainable parameters per
  adapted matrix and h = W₀x + (α/r)·B·A·x. No gradient and no optimizer state for W₀.
- Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" (arXiv:2305.14314), §3: the base
  weights in 4-bit NormalFloat (NF4, 0.5 B/param) with one absmax constant per block of 64 weights, and
  Double Quantization of those constants: 8-bit constants, with one fp32 second-level constant per block of
  256 first-level ones (32/64 bits → 8/64 + 32/(64·256) bits per parameter). bitsandbytes
  `bitsandbytes/functional.py` `quantize_4bit` (blocksize 64, `compress_statistics`: `quantize_blockwise` of
  absmax − mean in blocks of 256, plus the fp32 mean).
- peft 0.21 `peft/tuners/lora/layer.py` (`LoraLayer.update_layer`, `Linear.forward`) and
  `peft/tuners/tuners_utils.py` (`_cast_adapter_dtype`): adapters are `nn.Linear(in, r)` and `nn.Linear(r, out)`
  without biases; `get_peft_model(autocast_adapter_dtype=True)` (the default) keeps them in fp32 when the
  base is fp16/bf16, and `Linear.forward` casts the input to the adapter's dtype (`_cast_input_dtype`).

What autograd saves under LoRA, measured here (tests/test_finetune.py, results/finetune/) with torch 2.13 on
CPU: a frozen weight needs no weight gradient, so its matmul does not save its input (torch saves a tensor
only for the gradients some input requires); the frozen norms' weight multiplies keep nothing for their
weights; the first block's input (the frozen embedding's output) needs no gradient, so the first norm keeps
nothing. Per adapted linear, lora_A keeps its input (the base linear's own input when the dtypes agree and
there is no dropout: one storage for q, k and v; else a per-adapter copy: the fp32 cast, the autocast copy,
or the dropout output with its mask) and lora_B keeps lora_A's r-wide output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from formulas.architecture import Architecture
from formulas.memory import ModelStates
from formulas.precision import activation_bytes_per_element, is_mixed, optimizer_bytes_per_param
from formulas.units import ceil_div

Finetune = Literal["full", "lora", "qlora"]
FINETUNES: tuple[str, ...] = get_args(Finetune)

ADAPTER_BYTES = 4
"""peft keeps adapters in fp32 (`autocast_adapter_dtype=True` upcasts fp16/bf16 ones): 4 B/param, and their
gradients (the parameters' dtype) too."""
NF4_BITS = 4
NF4_BLOCK = 64
"""QLoRA §3: one absmax per 64 weights (bitsandbytes `quantize_4bit` blocksize 64)."""
DQ_BLOCK = 256
"""QLoRA §3 Double Quantization: the 8-bit absmax constants are quantised in blocks of 256 (fp32 constant each)."""
FP32 = 4
INDEX_BYTES = 8

HU = "Hu et al. 2021 (LoRA, arXiv:2106.09685)"
DETTMERS = "Dettmers et al. 2023 (QLoRA, arXiv:2305.14314) §3"


@dataclass(frozen=True)
class BlockLinear:
    """One linear of a transformer block as transformers names it (what peft's `target_modules` match)."""

    path: str
    """Its name inside the block: `self_attn.q_proj`, `attn.c_attn`."""
    group: str
    """The input it reads: attn_in (the first norm's output), attn_out (the attention output), mlp_in, mlp_out."""
    in_features: int
    out_features: int


LORA_FAMILIES: tuple[str, ...] = ("gpt2", "llama", "mistral", "qwen2")
"""transformers model types whose LoRA runs are measured (`results/finetune`, tests/test_finetune.py): GPT-2's and
Llama's code with its separate q, k, v, gate and up projections. Llama's other descendants differ where LoRA
reaches (Phi-3's fused projections, Gemma's RMSNorm, QK-norms, experts): refused until measured."""

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn", "attn.c_proj"),
}
"""The attention projections of each code family (peft's own default, `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_
MAPPING` in `peft/utils/constants.py`, adapts only q_proj and v_proj for Llama and c_attn for GPT-2)."""


def block_linears(arch: Architecture, family: str) -> tuple[BlockLinear, ...]:
    """The linears of one block of transformers' `family` code (`formulas.families.code_family`)."""
    h, q, kv, f = arch.hidden, arch.q_width, arch.kv_width, arch.ffn_hidden
    if family == "gpt2":  # GPT2Block: Conv1D layers (`transformers/models/gpt2/modeling_gpt2.py`)
        return (
            BlockLinear("attn.c_attn", "attn_in", h, q + 2 * kv),
            BlockLinear("attn.c_proj", "attn_out", q, h),
            BlockLinear("mlp.c_fc", "mlp_in", h, f),
            BlockLinear("mlp.c_proj", "mlp_out", f, h),
        )
    if family == "llama":  # LlamaDecoderLayer (`transformers/models/llama/modeling_llama.py`)
        mlp = (("gate_proj",) if arch.mlp == "swiglu" else ()) + ("up_proj",)
        return (
            BlockLinear("self_attn.q_proj", "attn_in", h, q),
            BlockLinear("self_attn.k_proj", "attn_in", h, kv),
            BlockLinear("self_attn.v_proj", "attn_in", h, kv),
            BlockLinear("self_attn.o_proj", "attn_out", q, h),
            *(BlockLinear(f"mlp.{name}", "mlp_in", h, f) for name in mlp),
            BlockLinear("mlp.down_proj", "mlp_out", f, h),
        )
    raise ValueError(f"LoRA is modelled for transformers' GPT-2 and Llama code (Llama, Mistral, Qwen2), not {family}")


def parse_targets(targets: str | None, family: str) -> tuple[str, ...]:
    """`--lora-targets` as a tuple of names (None: the family's attention projections)."""
    if targets is None:
        return DEFAULT_TARGETS[family]
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not names:
        raise ValueError("--lora-targets must name at least one module (e.g. q_proj,v_proj)")
    return names


def _matches(path: str, target: str) -> bool:
    """peft's suffix match (`peft/tuners/tuners_utils.py` `check_target_module_exists`): the name or a dotted tail."""
    return path == target or path.endswith("." + target)


def targeted(arch: Architecture, family: str, targets: str | None) -> tuple[BlockLinear, ...]:
    """The block linears that the targets adapt; a target that matches none is an error."""
    linears = block_linears(arch, family)
    names = parse_targets(targets, family)
    for name in names:
        if not any(_matches(lin.path, name) for lin in linears):
            known = ", ".join(lin.path.rsplit(".", 1)[-1] if family == "llama" else lin.path for lin in linears)
            raise ValueError(f"--lora-targets {name!r} matches no linear of a {family} block (known: {known})")
    return tuple(lin for lin in linears if any(_matches(lin.path, n) for n in names))


def lora_params(arch: Architecture, family: str, rank: int, targets: str | None = None) -> int:
    """Trainable LoRA parameters: Σ r·(in + out) over the adapted linears of every block (Hu et al. §4.1)."""
    return arch.n_layers * sum(rank * (lin.in_features + lin.out_features) for lin in targeted(arch, family, targets))


def quantized_params(arch: Architecture, family: str) -> int:
    """Weights bitsandbytes stores in NF4: every linear of the blocks (transformers' bnb integration replaces
    `nn.Linear` and GPT-2's `Conv1D` and keeps the output layer in the compute dtype); biases are not quantised."""
    return arch.n_layers * sum(lin.in_features * lin.out_features for lin in block_linears(arch, family))


def nf4_bytes(elements: int, double_quant: bool = True) -> int:
    """One NF4 weight tensor: 4-bit codes plus its quantisation constants (QLoRA §3, bitsandbytes `quantize_4bit`).

    blocks = ⌈n/64⌉; with Double Quantization the constants are 1 byte per block plus an fp32 per 256 blocks and
    the fp32 mean that `quantize_4bit` subtracts; without, an fp32 absmax per block."""
    blocks = ceil_div(elements, NF4_BLOCK)
    constants = blocks + FP32 * ceil_div(blocks, DQ_BLOCK) + FP32 if double_quant else FP32 * blocks
    return ceil_div(elements * NF4_BITS, 8) + constants


def qlora_base_weight_bytes(arch: Architecture, family: str, total_params: int, elem_bytes: int) -> int:
    """The frozen base under QLoRA: NF4 linears with their constants, the rest in the compute dtype."""
    per_layer = sum(nf4_bytes(lin.in_features * lin.out_features) for lin in block_linears(arch, family))
    return arch.n_layers * per_layer + elem_bytes * (total_params - quantized_params(arch, family))


def finetune_states(
    arch: Architecture, family: str, total_params: int, *, finetune: str, precision: str, optimizer: str,
    rank: int, targets: str | None = None,
) -> ModelStates:  # fmt: skip
    """Weights, gradients and optimizer state of LoRA/QLoRA on one GPU.

    weights   = frozen base (bytes/param × P, or NF4 under QLoRA) + 4·P_lora (fp32 adapters)
    gradients = 4·P_lora (the base has none)
    optimizer = the optimizer's fp32 state × P_lora (AdamW m + v: 8·P_lora; no master copy: the adapters
                already are fp32), + AdamW's `step` counter per adapter tensor (a 0-dim fp32 tensor each,
                torch/optim/adamw.py `_init_group`): 4 B × 2 per adapted linear per layer
    """
    adapters = lora_params(arch, family, rank, targets)
    e = activation_bytes_per_element(precision)
    base = qlora_base_weight_bytes(arch, family, total_params, e) if finetune == "qlora" else e * total_params
    return ModelStates(
        weights=base + ADAPTER_BYTES * adapters,
        gradients=ADAPTER_BYTES * adapters,
        optimizer=optimizer_bytes_per_param(optimizer, "fp32") * adapters
        + (FP32 * 2 * arch.n_layers * len(targeted(arch, family, targets)) if optimizer == "adamw" else 0),
    )


def _group_width(arch: Architecture, group: str) -> int:
    return {"attn_in": arch.hidden, "attn_out": arch.q_width, "mlp_in": arch.hidden, "mlp_out": arch.ffn_hidden}[group]


def lora_layer_delta(
    arch: Architecture, family: str, seq: int, batch: int, *, precision: str, rank: int, dropout: float,
    targets: str | None = None, cpu: bool = True, first: bool = False, kept: tuple[str, ...] = (),
) -> int:  # fmt: skip
    """Bytes one block saves under LoRA minus what it saves in full fine-tuning (no recomputation).

    − e·sb·w for each linear input that only the frozen weight's gradient needed (a group none adapts, or one
      whose adapters take a copy instead);
    + per adapter: its input copy (4·sb·in cast to the fp32 adapter; 2·sb·in under autocast, which casts that
      back for the matmul; with dropout the dropout output and its mask, a CPU mask in the input's dtype),
      lora_A's output sb·r at the adapter's compute bytes (fp32, or e under autocast), and under autocast the
      e-byte copies of A and B that autocast makes and autograd keeps for the input's gradient: e·r·(in + out).
    `first`: the first block, whose attention input needs no gradient (frozen embeddings): its adapters there
    keep no dropout mask and no copy of A. `kept`: groups whose input another op saves anyway (the same storage). The implementation's own frozen-weight savings (norm outputs kept
    for norm weights) are in `frozen_norm_delta`."""
    e = activation_bytes_per_element(precision)
    sb = seq * batch
    adapted = targeted(arch, family, targets)
    mixed = is_mixed(precision)
    cast = e != ADAPTER_BYTES  # peft casts the input to the fp32 adapter
    copies = cast or dropout > 0
    delta = 0
    for group in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
        if group not in kept and (copies or not any(lin.group == group for lin in adapted)):
            delta -= e * sb * _group_width(arch, group)
    for lin in adapted:
        no_input_grad = first and lin.group == "attn_in"
        x = ADAPTER_BYTES if cast else e  # the input as dropout sees it (peft casts first)
        if dropout > 0 and not no_input_grad:
            delta += (x if cpu else 1) * sb * lin.in_features  # the mask
        if copies:
            delta += (e if mixed else x) * sb * lin.in_features  # what lora_A saves: autocast copies to e
        delta += (e if mixed else ADAPTER_BYTES) * sb * rank
        if mixed:
            delta += e * rank * (lin.out_features + (0 if no_input_grad else lin.in_features))
    return delta


def frozen_norm_delta(arch: Architecture, family: str, seq: int, batch: int, *, precision: str) -> tuple[int, int]:
    """(every block, the first block only): what transformers' norms stop saving with frozen weights.

    Llama's RMSNorm multiplies its weight by the normalised input and keeps that input for the weight's gradient:
    −e·sbh per norm. The first block's input needs no gradient (frozen embeddings): its first norm keeps nothing
    (RMSNorm: the fp32 input and 1/rms; LayerNorm: the input, mean and 1/std)."""
    e = activation_bytes_per_element(precision)
    sb, h = seq * batch, arch.hidden
    if family == "llama":
        return -2 * e * sb * h, -(FP32 * sb * h + FP32 * sb)
    return 0, -(e * sb * h + 2 * e * sb)


def frozen_outside_delta(arch: Architecture, family: str, seq: int, batch: int, *, precision: str,
                         cpu: bool = True, input_grads: bool = False) -> int:  # fmt: skip
    """Outside the blocks: the output layer's input (−e·sbh, for its frozen weight), the final RMSNorm's
    normalised input (Llama), the token ids the frozen embedding kept for its weight gradient (−8·sb); GPT-2 also
    its position ids (−8·s) and the embedding dropout's mask (−m·sbh: dropout of a tensor needing no gradient
    keeps nothing), unless `input_grads` (`enable_input_require_grads`, with recomputation) makes the token
    embedding's output need a gradient."""
    e = activation_bytes_per_element(precision)
    sb, h = seq * batch, arch.hidden
    delta = -e * sb * h * (2 if family == "llama" else 1) - INDEX_BYTES * sb
    if family == "gpt2":
        delta -= INDEX_BYTES * seq + ((e if cpu else 1) * sb * h if arch.dropout > 0 and not input_grads else 0)
    return delta


def finetune_sources(arch: Architecture, family: str, total_params: int, *, finetune: str, precision: str,
                     optimizer: str, rank: int, targets: str | None) -> dict[str, str]:  # fmt: skip
    """The source column of `tmath predict` for the model states under LoRA/QLoRA."""
    adapters = lora_params(arch, family, rank, targets)
    names = ",".join(parse_targets(targets, family))
    e = activation_bytes_per_element(precision)
    if finetune == "qlora":
        q = quantized_params(arch, family)
        base = (f"{DETTMERS}: NF4 0.5 B × {q:,} block-linear weights + constants (blocks of {NF4_BLOCK}, double "
                f"quantisation in blocks of {DQ_BLOCK}), {e} B × the other {total_params - q:,}; predicted, not "
                "measured (no bitsandbytes here)")  # fmt: skip
    else:
        base = f"{HU}: frozen base {e} B/param × {total_params:,}"
    adapter = f"r·(in + out) per adapted linear ({names}, r={rank}) × {arch.n_layers} layers = {adapters:,} params"
    opt = optimizer_bytes_per_param(optimizer, "fp32")
    return {
        "weights": f"{base}; + fp32 adapters 4 B × {adapters:,} (peft autocast_adapter_dtype)",
        "gradients": f"{HU}: adapters only, fp32 4 B × {adapter}",
        "optimizer": f"{optimizer} {opt} B/param × {adapters:,} fp32 adapters (no master copy; the base has none)"
        + ("; + a 4 B step counter per adapter tensor" if optimizer == "adamw" else ""),
    }


QUERY_KEY = ("self_attn.q_proj", "self_attn.k_proj", "attn.c_attn")
"""The linears whose adapters make the first block's attention scores need a gradient."""


def first_block_note(arch: Architecture, family: str, training) -> list[str]:
    """What the first block's count assumes: an adapter on its query or key projection (measured)."""
    t = training
    if t.recompute == "full" or any(lin.path in QUERY_KEY for lin in targeted(arch, family, t.lora_targets)):
        return []
    return ["LoRA without a query/key adapter: the first block's attention needs no gradient and keeps less than "
            "counted (an over-count of the first block only; measured on tiny CPU shapes, not modelled)"]  # fmt: skip


def lora_implementation(arch: Architecture, family: str, training, layers: list[int], *, cpu: bool = True):
    """(bytes per layer, bytes added outside the layers) of transformers' `family` under LoRA, from its full
    fine-tuning account `layers` (`formulas.variants`); `training` is the spec's TrainingSettings. The first block
    is exact when an adapter reads its query or key projection (`first_block_note`)."""
    t = training
    kw = {"precision": t.precision}
    if t.recompute == "full":
        # Each checkpointed block keeps only its input, which enable_input_require_grads makes need a gradient
        # in the first block too; the adapters' tensors are recomputed with the block.
        return list(layers), frozen_outside_delta(arch, family, t.seq, t.batch, cpu=cpu, input_grads=True, **kw)
    # Llama's SDPA output is o_proj's input itself (`.transpose(1, 2).contiguous()` of the kernel's (b, s, a, d)
    # storage is a view): the fused kernel keeps it for its backward whether o_proj is frozen or not.
    fused_sdpa = t.attention == "flash" and not (cpu and arch.dropout > 0)
    kept = ("attn_out",) if family == "llama" and fused_sdpa else ()
    lora = {"rank": t.lora_rank, "dropout": t.lora_dropout, "targets": t.lora_targets, "cpu": cpu, "kept": kept,
            **kw}  # fmt: skip
    every, first = frozen_norm_delta(arch, family, t.seq, t.batch, **kw)
    rest = lora_layer_delta(arch, family, t.seq, t.batch, **lora) + every
    head = lora_layer_delta(arch, family, t.seq, t.batch, first=True, **lora) + every + first
    out = [layers[0] + head] + [n + rest for n in layers[1:]]
    return out, frozen_outside_delta(arch, family, t.seq, t.batch, cpu=cpu, **kw)
