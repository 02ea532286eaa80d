"""The report's "Fine-tuning (LoRA)" section: each LoRA run's trainable parameters, model states and saved bytes
against `formulas.finetune` (through `formulas.predict` and the implementation variant), beside full fine-tuning
of the same model and precision where the sweep measured it."""

from __future__ import annotations

import pandas as pd

from formulas.spec import lora_defaults
from harness.formatting import gib
from harness.records import Record
from harness.results import run_label

STATES = ("weights", "gradients", "optimizer")


def _ratio(measured, predicted) -> str:
    if measured is None or not predicted:
        return "-"
    return f"{measured / predicted:.4f}"


def _twin(r: Record, records: list[Record]) -> Record | None:
    """The full fine-tuning run of the same spec (finetune and the LoRA settings at their defaults)."""
    full = r.spec.replace(finetune="full", **lora_defaults())
    key = full.key()
    return next((x for x in records if x.status == "ok" and x.spec_key == key), None)


def lora_table(records: list[Record]) -> pd.DataFrame:
    rows = []
    for r in records:
        if r.status != "ok" or r.spec.training.finetune == "full":
            continue
        mem, pred = r.measured.memory_bytes, r.prediction("korthikanti")
        impl = r.prediction("implementation")
        states = sum(getattr(mem, t) for t in STATES)
        predicted_states = sum(getattr(pred.memory_bytes, t) for t in STATES)
        twin = _twin(r, records)
        row = {
            "run": run_label(r.spec, device=r.device),
            "trainable (adapters)": f"{r.measured.trainable_params:,}" if r.measured.trainable_params else "-",
            "predicted": f"{pred.trainable_params:,}" if pred.trainable_params is not None else "-",
            "model states GiB": gib(states),
            "states meas/pred": _ratio(states, predicted_states),
            "activations GiB": gib(mem.activations),
            "act. meas/impl": _ratio(mem.activations, impl.total if impl is not None else None),
            "act. meas/paper": _ratio(mem.activations, pred.memory_bytes.activations),
        }
        if twin is not None:
            tm = twin.measured.memory_bytes
            row["states vs full"] = _ratio(states, sum(getattr(tm, t) for t in STATES))
            row["act. vs full"] = _ratio(mem.activations, tm.activations)
        rows.append(row)
    return pd.DataFrame(rows)


def section(doc, records: list[Record]) -> None:
    table = lora_table(records)
    if table.empty:
        return
    doc.heading("Fine-tuning (LoRA)")
    doc.para(
        "LoRA runs (peft on transformers models): the trainable parameters counted from the model (requires_grad "
        "numel) and by `formulas.finetune` (r·(in + out) per adapted linear); model states (weights with the "
        "frozen base, the adapters' fp32 gradients and optimizer state) measured / predicted; the bytes autograd "
        "saved against the implementation variant with LoRA's terms (`formulas.variants` + `formulas.finetune`) "
        "and against the paper's count with the same LoRA terms; and, where the sweep measured it, the same model "
        "fully fine-tuned (LoRA ÷ full)."
    )
    doc.table(table)
