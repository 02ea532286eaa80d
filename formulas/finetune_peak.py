"""The peak of a LoRA/QLoRA step: `formulas.peak`'s walk of the plain trainer with a frozen base.

peft's adapters change the step's moments, not their order (`formulas.peak`'s module docstring names them):

    saved for backward   transformers' own account with the LoRA terms (`formulas.variants.implementation_summary`:
                         frozen linears keep no input, each adapter its input and r-wide output; measured to the
                         byte, tests/test_finetune.py)
    gradients            the adapters' only, fp32 (G = 4·P_lora): no output-projection gradient H, no embedding
                         gradient and no tied sum out of place (the base is frozen)
    top layer            its MLP backward keeps the incoming gradient, its residual copy and the projection's input
                         gradient (e·b·s·(2h + f)); the frozen projection makes no weight gradient
    optimizer step       AdamW over the adapters: fp32 already, so no master copy; for-loop AdamW's temporaries
                         (CPU) over the adapter tensors in peft's order (per block, per adapted linear, A then B)

The backward start (the loss's two fp32 logit gradients beside everything saved) is what decides a LoRA step:
the states are small, the logits are not. Measured against the committed CPU runs (`results/finetune`): equal
to within 4 KB without recompute; under full recompute 0.1-0.3% under (`tests/test_finetune.py`).
"""

from __future__ import annotations

from dataclasses import replace

from formulas.families import code_family
from formulas.finetune import ADAPTER_BYTES, targeted
from formulas.memory import ModelStates
from formulas.peak import PeakPrediction, for_loop_adamw_temporaries, plain_step_peak, step_bytes, target_device
from formulas.precision import activation_bytes_per_element
from formulas.spec import RunSpec
from formulas.variants import implementation_summary

SOFTMAX_AS_FULL = (
    "LoRA: the top layer's softmax-backward moment (eager attention) is counted as full fine-tuning's, with its "
    "weight gradients and saved tensors: an upper bound for that moment"
)
PAPER_COUNT = (
    "activations: the paper's count with the LoRA terms (transformers' own account under LoRA is measured on the "
    "CPU, --impl hf); the output layer's saved tensors as full fine-tuning's"
)
QLORA_KERNELS = "QLoRA: bitsandbytes' dequantisation transients (not measured: no bitsandbytes on the CPU)"


def adapter_tensors(spec: RunSpec) -> list[int]:
    """Elements of each adapter tensor in the order peft registers them: per block, per adapted linear, lora_A
    (r × in) then lora_B (out × r)."""
    arch, t = spec.model.arch, spec.training
    linears = targeted(arch, code_family(arch), t.lora_targets)
    per_block = [n for lin in linears for n in (t.lora_rank * lin.in_features, t.lora_rank * lin.out_features)]
    return per_block * arch.n_layers


def lora_step_peak(spec: RunSpec, states: ModelStates, paper_activations: int) -> PeakPrediction | None:
    """The walked peak of one steady LoRA/QLoRA step on one process, or None where it is not modelled (layouts
    other than one process, inference). Where transformers' account is not measured (a GPU, `--impl reference`)
    the activations are `paper_activations`, the paper's count with the LoRA terms, and the prediction says so."""
    arch, t, p = spec.model.arch, spec.training, spec.parallel
    if arch is None or spec.measurement.mode != "train" or p.gpus > 1 or p.zero or p.tp > 1 or p.pp > 1:
        return None
    spec = spec.replace(impl="hf")  # peft adapts transformers' models: their buffers, their saved tensors
    summary = implementation_summary(spec)
    base = step_bytes(spec, states, paper_activations)
    if summary is None:
        saved, output, unmeasured = paper_activations, base.output_activations, [PAPER_COUNT]
    else:
        saved, output, unmeasured = summary.total, summary.outside.output, list(summary.unmeasured)
    adapters = adapter_tensors(spec)
    e = activation_bytes_per_element(t.precision)
    cpu = target_device(spec.measurement.device) != "cuda"
    adamw = t.optimizer == "adamw"
    notes = [n for n in base.unmodelled if not n.startswith("activations:")] + unmeasured
    notes += [SOFTMAX_AS_FULL] if base.softmax_saved else []
    notes += [QLORA_KERNELS] if t.finetune == "qlora" else []
    return plain_step_peak(replace(
        base,
        activations=saved, output_activations=output,
        gradients=states.gradients, optimizer=states.optimizer,
        head_gradient=0, tied=False, embedding_gradients=0, embedding_transient=0,
        largest_gradient=ADAPTER_BYTES * max(adapters),
        step_temporaries=for_loop_adamw_temporaries(adapters, ADAPTER_BYTES) if adamw and cpu else 0,
        step_copies=0,
        layer_transient=e * t.batch * t.seq * (2 * arch.hidden + arch.ffn_hidden),
        unmodelled=tuple(notes),
        basis=base.basis.replace(", an fp32 master copy", "") + f", {t.finetune} (frozen base, fp32 adapters)",
    ))  # fmt: skip
