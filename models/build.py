"""The one entry point the harness calls: build a model, make its batch, find its transformer blocks.

Builds work on real devices, on `meta`, and under `torch._subclasses.fake_tensor.FakeTensorMode` with
`device="cpu"`: parameters are created in `dtype` directly (factory arguments for the reference
models, the default dtype around transformers' constructor), never converted with `.to(dtype)`.
"""

from __future__ import annotations

import torch
from torch import nn

from formulas.architecture import Architecture
from formulas.spec import IMPLS
from models.bert import Bert
from models.gpt import GPT
from models.hf import HFLossModel, build_hf
from models.lora import apply_lora


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")


def build_model(
    arch: Architecture,
    *,
    impl: str = "reference",
    attention: str = "eager",
    recompute: str = "none",
    device=None,
    dtype=None,
    lora: dict | None = None,
) -> nn.Module:
    """A model in train mode whose `forward(**make_batch(...))` returns the scalar loss.

    `impl="reference"`: `models.gpt.GPT` or `models.bert.Bert`. `impl="hf"`: the transformers model
    of the same architecture (`models.hf.build_hf`); with `lora` (rank, alpha, dropout, targets) its base
    frozen and peft's LoRA adapters added (`models.lora.apply_lora`).
    """
    _check_impl(impl)
    if lora is not None and impl != "hf":
        raise ValueError("LoRA is built through peft on the transformers models: impl hf")
    if impl == "hf":
        model = build_hf(arch, attention=attention, recompute=recompute, device=device, dtype=dtype)
        if lora is not None:
            model = apply_lora(model, arch, recompute=recompute, **lora)
    elif arch.family == "decoder":
        model = GPT(arch, attention=attention, recompute=recompute, device=device, dtype=dtype)
    else:
        model = Bert(arch, attention=attention, recompute=recompute, device=device, dtype=dtype)
    return model.train()


def make_batch(
    arch: Architecture,
    batch: int,
    seq: int,
    *,
    device=None,
    generator: torch.Generator | None = None,
    impl: str = "reference",
) -> dict[str, torch.Tensor]:
    """Random token ids and labels with the keys the built model's forward takes (the same for both impls).

    Decoder: `input_ids`, `labels` (B, T). Encoder: `input_ids`, then `token_type_ids` (B, T) when the
    architecture has a token-type table, `labels` (B, T) with the MLM head, `next_sentence_label` (B,)
    with the NSP head. transformers' causal-LM loss shifts the labels itself; the reference model
    scores every position (the ids are random, so nothing is lost).
    """
    _check_impl(impl)
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    if seq > arch.max_positions:
        raise ValueError(f"seq {seq} exceeds the architecture's max_positions {arch.max_positions}")

    def ints(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, device=device, generator=generator)

    out = {"input_ids": ints(arch.vocab, batch, seq)}
    if arch.family == "decoder":
        out["labels"] = ints(arch.vocab, batch, seq)
        return out
    if arch.type_vocab:
        out["token_type_ids"] = ints(arch.type_vocab, batch, seq)
    if arch.mlm_head:
        out["labels"] = ints(arch.vocab, batch, seq)
    if arch.nsp_head:
        out["next_sentence_label"] = ints(2, batch)
    return out


_BLOCK_PATHS = (
    "blocks",  # models.gpt.GPT, models.bert.Bert
    "transformer.h",  # GPT2LMHeadModel
    "gpt_neox.layers",  # GPTNeoXForCausalLM
    "model.layers",  # LlamaForCausalLM
    "bert.encoder.layer",  # BertForPreTraining, BertForMaskedLM
    "encoder.layer",  # BertModel
)


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The L transformer blocks in order, as (qualified name within `model`, module) pairs.

    Works for the reference models, the `HFLossModel` wrapper and bare transformers models.
    """
    prefix, root = "", model
    if isinstance(model, HFLossModel):
        prefix, root = "model.", model.model
    if hasattr(root, "get_base_model"):  # a peft PeftModel: PeftModel.base_model (LoraModel).model
        prefix, root = prefix + "base_model.model.", root.get_base_model()
    for path in _BLOCK_PATHS:
        try:
            blocks = root.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return [(f"{prefix}{path}.{i}", block) for i, block in enumerate(blocks)]
    raise ValueError(
        f"cannot find the transformer blocks of {type(root).__name__} (looked for {', '.join(_BLOCK_PATHS)})"
    )
