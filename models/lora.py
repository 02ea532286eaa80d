"""LoRA adapters on a transformers model through peft (Hu et al. 2021, arXiv:2106.09685).

`get_peft_model(model, LoraConfig(...))` freezes every base weight (`requires_grad=False`) and wraps each target
linear in a `peft.tuners.lora.Linear` with `lora_A` (in → r) and `lora_B` (r → out), no biases. peft's defaults are
kept where they decide memory: `autocast_adapter_dtype=True` (fp16/bf16 adapters are upcast to fp32,
`peft/tuners/tuners_utils.py` `_cast_adapter_dtype`) and the input cast to the adapter's dtype in
`Linear.forward`. With full recomputation, peft's guide (`prepare_model_for_kbit_training`, "gradient
checkpointing") calls `enable_input_require_grads` so that the checkpointed blocks see an input that needs a
gradient although the embedding is frozen.
"""

from __future__ import annotations

from torch import nn

from formulas.families import code_family
from formulas.finetune import targeted
from models.hf import HFLossModel


def apply_lora(model: HFLossModel, arch, *, rank: int, alpha: int, dropout: float, targets: str | None,
               recompute: str = "none") -> HFLossModel:  # fmt: skip
    """Wrap `model.model` (a transformers model) in a `PeftModel` with LoRA on `targets` (names as
    `formulas.finetune` resolves them: the family's attention projections by default)."""
    from peft import LoraConfig, get_peft_model

    adapted = targeted(arch, code_family(arch), targets)
    names = sorted({lin.path for lin in adapted})  # full paths inside a block: one match each, no ambiguity
    # GPT-2's Conv1D stores its weight (in, out): peft's fan_in_fan_out (which it would set itself, with a warning).
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                        fan_in_fan_out=code_family(arch) == "gpt2")  # fmt: skip
    if recompute == "full":
        model.model.enable_input_require_grads()
    model.model = get_peft_model(model.model, config)
    return model.train()


def trainable_parameters(model: nn.Module) -> int:
    """Σ numel of the parameters that require a gradient (peft's `get_nb_trainable_parameters()[0]`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
