"""Records for tests, built from JSON-shaped parts as a measuring process would report them."""

from __future__ import annotations

from formulas.spec import RunSpec
from harness.records import Outcome, Record


def make_record(
    spec: RunSpec,
    *,
    status: str = "ok",
    measured: dict | None = None,
    error: dict | None = None,
    environment: dict | None = None,
    elapsed_s: float | None = None,
) -> Record:
    outcome = Outcome.from_dict(
        {
            "status": status,
            "measured": measured or {},
            "error": error,
            "environment": environment,
            "elapsed_s": elapsed_s,
        }
    )
    return Record.make(spec, outcome)


def saved_by_block(model, spec: RunSpec, batch) -> tuple[list[int], int]:
    """Bytes each transformer block saves for backward in one forward of `batch`, and the bytes saved outside the
    blocks, attributed as `harness.measure` attributes them (`SavedTensorTracker`, parameters excluded)."""
    from harness.memtrack import SavedTensorTracker
    from harness.trainers.plain import PlainTrainer
    from models.build import transformer_blocks

    trainer = PlainTrainer(model, spec.replace(optimizer="sgd"), device_type="cpu")
    blocks = transformer_blocks(model)
    with SavedTensorTracker(exclude=model, modules=blocks) as saved:
        loss = trainer.forward(batch)
    del loss
    by_layer = [saved.bytes_by_module.get(name, 0) for name, _ in blocks]
    return by_layer, saved.total_bytes - sum(by_layer)
