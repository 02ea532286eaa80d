"""Pipeline parallel through torch.distributed.pipelining on CPU: the split of the model into stages, and what
each rank holds, exact to the byte.

Fast tests split a tiny GPT in one process: the stages chained reproduce the model, each rank keeps exactly its
stages' parameters (with a copy of a tied embedding on the last stage), and the stages' saved bytes add up to
the whole model's. Slow tests run two gloo ranks through the harness, per schedule: the parameters per stage
against the formula, the activations of one micro-batch per block against Korthikanti's generalised count,
and the most activations a rank holds in flight against `formulas.parallel.in_flight_chunks` micro-batches.
"""

from __future__ import annotations

import pytest
import torch

from formulas import activations as act
from formulas.parallel import in_flight_chunks, rank_stages, stage_blocks
from formulas.params import embedding_params, head_params, layer_params, pipeline_stage_params
from harness.distributed import run_distributed
from harness.memtrack import SavedTensorTracker
from harness.records import RankResult, Record
from harness.specbuild import build_spec
from harness.trainers.stages import ChunkTracker, SavedLedger, StageModule, keep_only
from models.build import build_model

TINY = {"model": "gpt2", "layers": 4, "hidden": 64, "heads": 4, "vocab": 128, "max_positions": 64, "seq": 64}
RUN = {"batch": 2, "device": "cpu", "steps": 0, "warmup": 0, "gpus": 2, "pp": 2, "precision": "fp32"}


def spec_of(**settings):
    return build_spec({**TINY, **RUN, **settings})


def tiny_model(spec):
    torch.manual_seed(0)
    return build_model(spec.model.arch)


def split(model, n_stages: int) -> list[StageModule]:
    L = len(model.blocks)
    return [StageModule(model, s, n_stages, stage_blocks(L, n_stages, s)) for s in range(n_stages)]


def state_keys(model) -> set[int]:
    """Storages of the parameters and buffers: model state, not activations."""
    return {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}


def stage_params(arch, n_stages: int, stage: int) -> int:
    """Parameters of one stage: its blocks, the embeddings on the first, the head on the last (with a copy of
    a tied embedding matrix: the first stage's is on another rank)."""
    total = len(stage_blocks(arch.n_layers, n_stages, stage)) * layer_params(arch)
    if stage == 0:
        total += embedding_params(arch)
    if stage == n_stages - 1:
        total += head_params(arch) + (arch.vocab * arch.hidden if arch.tied_embeddings else 0)
    return total


# --------------------------------------------------------------------------------------------------
# One process: the split


@pytest.mark.parametrize("n_stages", [2, 4])
def test_stages_chained_are_the_model(n_stages):
    spec = spec_of()
    model = tiny_model(spec).eval()  # dropout off: the same numbers
    ids = torch.randint(0, spec.model.arch.vocab, (2, 16))
    x = ids
    for stage in split(model, n_stages):
        x = stage(x)
    torch.testing.assert_close(x, model.prefill(ids), rtol=0, atol=0)


@pytest.mark.parametrize(("pp", "v"), [(2, 1), (2, 2)])
def test_each_rank_keeps_its_stages_parameters_only(pp, v):
    spec = spec_of()
    arch = spec.model.arch
    for rank in range(pp):
        model = tiny_model(spec)
        stages = [s for s in split(model, pp * v) if s.index in rank_stages(rank, pp, v)]
        keep_only(model, stages)
        held = sum(p.numel() for p in model.parameters())
        assert held == sum(stage_params(arch, pp * v, s.index) for s in stages)
        assert held == sum(p.numel() for s in stages for p in s.parameters())
    if v == 1:  # formulas.params agrees, tied copy included
        assert [stage_params(arch, pp, s) for s in range(pp)] == pipeline_stage_params(arch, pp)


def test_last_stage_keeps_the_tied_embedding_as_its_own():
    spec = spec_of()
    model = tiny_model(spec)
    stages = split(model, 2)
    keep_only(model, stages[1:])
    assert (
        model.wte is None
        and not hasattr(stages[1], "wte")
        and model.lm_head.weight.shape == (spec.model.arch.vocab, spec.model.arch.hidden)
    )


def test_stage_saved_bytes_add_up_to_the_models():
    """Each stage forward on its own (a non-first stage from a detached input, as a receive buffer is) saves
    what the whole model's forward saves, split by stage: nothing is lost or counted twice at a boundary."""
    spec = spec_of()
    arch = spec.model.arch
    model = tiny_model(spec)
    ids = torch.randint(0, arch.vocab, (2, 64))
    labels = torch.randint(0, arch.vocab, (2, 64))
    from models.build import transformer_blocks

    with SavedTensorTracker(exclude=model, modules=transformer_blocks(model)) as whole:
        loss = model(ids, labels)
    del loss
    stages = split(model, 2)
    ledger = SavedLedger(state_keys(model))
    totals, x, outputs = [], ids, []
    for stage in stages:
        tracker = ChunkTracker(ledger, model, stage.named_blocks())
        tracker.chunk = (stage.index, 0)
        with tracker:
            out = stage(x)
            if stage.index == 1:
                out = torch.nn.functional.cross_entropy(out.float().view(-1, arch.vocab), labels.clone().view(-1))
        totals.append(tracker.total_bytes)
        outputs.append(out)
        x = out.detach().requires_grad_()
    assert sum(totals) == whole.total_bytes
    assert ledger.peak_bytes == ledger.live_bytes == whole.total_bytes and ledger.peak_chunks == 2


def test_ledger_releases_a_microbatch_at_its_backward():
    spec = spec_of()
    arch = spec.model.arch
    model = tiny_model(spec)
    stage = split(model, 1)[0]
    ledger = SavedLedger(state_keys(model))
    tracker = ChunkTracker(ledger, model, stage.named_blocks())
    losses, per_mb = [], []
    for mb in range(2):
        tracker.chunk = (0, mb)
        with tracker:
            losses.append(stage(torch.randint(0, arch.vocab, (1, 32))).sum())
        per_mb.append(tracker.total_bytes)
    assert per_mb[0] == per_mb[1] > 0
    assert ledger.live_bytes == ledger.peak_bytes == sum(per_mb) and ledger.peak_chunks == 2
    losses.pop(0).backward()
    assert ledger.live_bytes == per_mb[1]
    losses.pop().backward()
    assert ledger.live_bytes == 0 and ledger.peak_bytes == sum(per_mb)


# --------------------------------------------------------------------------------------------------
# Two gloo ranks through the harness


@pytest.fixture(scope="module")
def records():
    """One two-rank run per case, shared by the tests below."""
    return {}


CASES = {
    "gpipe-1": {"pp_schedule": "gpipe", "microbatches": 1},
    "gpipe-2": {"pp_schedule": "gpipe", "microbatches": 2},
    "gpipe-4": {"pp_schedule": "gpipe", "microbatches": 4},
    "1f1b-2": {"pp_schedule": "1f1b", "microbatches": 2},
    "1f1b-4": {"pp_schedule": "1f1b", "microbatches": 4},
    "interleaved-1f1b-v2": {"pp_schedule": "interleaved-1f1b", "microbatches": 4, "virtual_stages": 2},
}


def record_of(records: dict, name: str) -> Record:
    if name not in records:
        records[name] = run_distributed(spec_of(**CASES[name]), timeout=600)
    return records[name]


def ranks_ok(record: Record) -> list[RankResult]:
    assert record.status == "ok", record.error
    ranks = record.measured.ranks
    assert [r.rank for r in ranks] == [0, 1] and all(r.status == "ok" for r in ranks)
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_holds_its_stages_and_their_activations(records, name):
    spec = spec_of(**CASES[name])
    p, t, arch = spec.parallel, spec.training, spec.model.arch
    n_stages = p.pp * p.virtual_stages
    per_layer = act.layer_bytes(arch, t.seq, t.batch, elem_bytes=4, mask_bytes=1, stats_bytes=4)
    for rank in ranks_ok(record_of(records, name)):
        m, e = rank.measured, rank.measured.engine
        mem = m.memory_bytes
        stages = rank_stages(e.coords["pp"], p.pp, p.virtual_stages)
        assert e.stages == stages and e.schedule == p.pp_schedule and e.microbatches == p.n_microbatches
        assert e.blocks == [b for s in stages for b in stage_blocks(arch.n_layers, n_stages, s)]
        params = sum(stage_params(arch, n_stages, s) for s in stages)
        assert e.parameter_elements == params
        assert mem.weights == mem.gradients == 4 * params
        # One micro-batch's activations: every block exactly as a plain forward saves it.
        assert m.activations_by_layer == [per_layer] * len(e.blocks)
        assert mem.activations == e.activations_per_microbatch[0] == mem.activations_layers + mem.activations_other
        assert len(set(e.activations_per_microbatch)) == 1  # every micro-batch saves the same


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_in_flight_activations_are_the_schedules_count(records, name):
    """The most saved bytes alive at once: in_flight_chunks(...) micro-batches of a stage's activations."""
    spec = spec_of(**CASES[name])
    p = spec.parallel
    for rank in ranks_ok(record_of(records, name)):
        e, mem = rank.measured.engine, rank.measured.memory_bytes
        r = e.coords["pp"]
        chunks = in_flight_chunks(p.pp_schedule, p.pp, p.n_microbatches, r, p.virtual_stages)
        assert e.in_flight_microbatches == chunks
        if p.virtual_stages == 1:
            assert mem.activations_in_flight == chunks * mem.activations
        elif r == 0:
            # Chunks of different local stages differ in size (the first stage's embedding, on rank 0 here):
            # within 2% of `chunks` mean-sized stage forwards on this 4-layer model. On the last rank the output
            # layer and loss make one local stage's chunks several times the other's: no mean applies.
            per_chunk = mem.activations / p.virtual_stages
            assert mem.activations_in_flight == pytest.approx(chunks * per_chunk, rel=0.02)


@pytest.mark.slow
def test_engine_buffers_are_named(records):
    spec = spec_of(**CASES["1f1b-4"])
    t, arch, M = spec.training, spec.model.arch, spec.parallel.n_microbatches
    hidden = t.batch * t.seq * arch.hidden * 4
    first, last = ranks_ok(record_of(records, "1f1b-4"))
    assert first.measured.engine.named_bytes["gradient receive buffers"] == M * hidden
    assert last.measured.engine.named_bytes["activation receive buffers"] == M * hidden
    # Two micro-batches in flight on the first stage keep their outputs in the forward cache; the schedule's
    # loop holds one more (measured: torch 2.13's Schedule1F1B keeps the previous output until the next forward).
    assert first.measured.engine.named_bytes["stage outputs kept for backward (most at once)"] == 3 * hidden
    assert any("tied output layer" in note for note in last.measured.engine.notes)


@pytest.mark.slow
def test_zero_bubble_holds_its_input_passes_until_the_weight_passes():
    spec = spec_of(pp_schedule="interleaved-zero-bubble", microbatches=4, virtual_stages=2)
    p = spec.parallel
    for rank in ranks_ok(run_distributed(spec, timeout=600)):
        e, mem = rank.measured.engine, rank.measured.memory_bytes
        # torch 2.13's ScheduleInterleavedZeroBubble: a warm-up of (v − 1)·R + (pp − 1 − r) forwards, and input
        # passes that keep their saved tensors to the weight pass r micro-batches later: (v − 1)·R + pp = 4.
        assert e.in_flight_microbatches == 4
        assert in_flight_chunks(p.pp_schedule, p.pp, p.n_microbatches, e.coords["pp"], 2) == 4
        assert rank.measured.flops_counted > 0  # the FLOP count step ran (module hooks suspended)
        assert len(set(e.activations_per_microbatch)) == 1 and mem.activations_in_flight > mem.activations


def ranks_ok_n(record: Record, n: int) -> list[RankResult]:
    assert record.status == "ok", record.error
    ranks = record.measured.ranks
    assert [r.rank for r in ranks] == list(range(n)) and all(r.status == "ok" for r in ranks)
    return ranks


@pytest.mark.slow
def test_tensor_parallel_within_stages():
    """pp 2 × tp 2 on four ranks: each rank holds its stage's parameters with the Megatron-split matrices
    halved, and the same in-flight count as without tensor parallel."""
    spec = spec_of(pp_schedule="1f1b", microbatches=2, tp=2, gpus=4)
    arch, p = spec.model.arch, spec.parallel
    h = arch.hidden
    # Split over t: the QKV and MLP-up weights and biases, the output projections' weights, the vocabulary rows
    # (the embedding on the first stage, the tied output layer's copy on the last).
    sharded_per_layer = 12 * h * h + 7 * h
    for rank in ranks_ok_n(run_distributed(spec, timeout=600), 4):
        e, mem = rank.measured.engine, rank.measured.memory_bytes
        stage = e.coords["pp"]
        sharded = len(e.blocks) * sharded_per_layer + arch.vocab * h
        assert e.parameter_elements == stage_params(arch, 2, stage) - sharded // 2
        chunks = in_flight_chunks(p.pp_schedule, p.pp, p.n_microbatches, stage)
        assert e.in_flight_microbatches == chunks and mem.activations_in_flight == chunks * mem.activations
