"""Exact byte counts of harness.memtrack on tiny CPU shapes.

Expected numbers are written out from shapes and dtypes (4 bytes per fp32 element, 2 per bf16,
1 per bool), so each test fails if a tracker drops, double-counts or mislabels one storage.
"""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from harness.memtrack import LiveTensorTracker, SavedTensorTracker

B, IN, OUT = 3, 5, 7


class Block(nn.Module):
    """Linear -> GELU -> Linear: saves the block input, the GELU input and the GELU output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --- SavedTensorTracker: one op at a time --------------------------------------------------------


def saved_by(fn, **tracker_kwargs) -> SavedTensorTracker:
    with SavedTensorTracker(**tracker_kwargs) as saved:
        output = fn()  # holds the graph, and so the saved tensors, until the tracker exits
    del output
    return saved


def test_linear_saves_its_input_and_the_excluded_weight():
    lin = nn.Linear(IN, OUT)
    x = torch.randn(B, IN, requires_grad=True)
    saved = saved_by(lambda: lin(x), exclude=lin)
    assert saved.total_bytes == B * IN * 4 == 60
    assert saved.count == 1
    assert saved.excluded_bytes == IN * OUT * 4  # the weight; the bias is not saved
    assert saved.bytes_by_module == {"other": 60}
    assert saved.bytes_by_dtype == {torch.float32: 60}
    assert saved.released_bytes == 0


def test_linear_without_exclude_counts_the_weight_as_saved():
    lin = nn.Linear(IN, OUT)
    x = torch.randn(B, IN, requires_grad=True)
    saved = saved_by(lambda: lin(x))
    assert saved.total_bytes == B * IN * 4 + IN * OUT * 4 == 200
    assert saved.count == 2
    assert saved.excluded_bytes == 0


def test_linear_saves_its_weight_only_when_its_input_needs_a_gradient():
    lin = nn.Linear(IN, OUT)
    saved = saved_by(lambda: lin(torch.randn(B, IN)))  # the input is still saved, for the weight gradient
    assert saved.total_bytes == B * IN * 4
    assert saved.count == 1


def test_output_dropped_during_forward_is_released_even_if_its_storages_live_on():
    lin = nn.Linear(IN, OUT)
    x = torch.randn(B, IN, requires_grad=True)
    with SavedTensorTracker(exclude=lin) as saved:
        lin(x)  # the graph dies at once; x and the weight stay alive
    assert (saved.total_bytes, saved.count, saved.excluded_bytes) == (0, 0, 0)
    assert saved.released_bytes == B * IN * 4 + IN * OUT * 4


def test_linear_with_3d_input_saves_one_view_of_the_input_storage():
    lin = nn.Linear(IN, OUT)
    saved = saved_by(lambda: lin(torch.randn(2, B, IN, requires_grad=True)), exclude=lin)
    assert saved.total_bytes == 2 * B * IN * 4 == 120
    assert saved.count == 1


def test_registered_causal_mask_buffer_is_excluded():
    class Masked(nn.Module):
        def __init__(self, s: int) -> None:
            super().__init__()
            self.register_buffer("future", torch.ones(s, s, dtype=torch.bool).triu(1))

        def forward(self, scores: torch.Tensor) -> torch.Tensor:
            return scores.masked_fill(self.future, float("-inf")).softmax(-1)

    s = 6
    module = Masked(s)
    scores = torch.randn(s, s, requires_grad=True)
    for exclude in (module, [module.future]):
        saved = saved_by(lambda: module(scores), exclude=exclude)
        assert saved.total_bytes == s * s * 4  # the softmax output
        assert saved.excluded_bytes == s * s  # the bool mask, saved by masked_fill
    assert saved_by(lambda: module(scores)).total_bytes == s * s * 4 + s * s


def test_matmul_of_two_non_contiguous_views_saves_both_storages():
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(6, 4, requires_grad=True)
    saved = saved_by(lambda: a.t() @ b.t())
    assert saved.total_bytes == 2 * 24 * 4 == 192
    assert saved.count == 2


def test_views_of_one_storage_count_once():
    x = torch.randn(4, 8, requires_grad=True)
    saved = saved_by(lambda: [x @ x.t(), x.view(8, 4).sin(), x[1:].cos()])  # mm saves x and x.t()
    assert saved.total_bytes == 4 * 8 * 4 == 128
    assert saved.count == 1


def test_softmax_saves_its_output_not_its_input():
    base = torch.randn(4, 10, requires_grad=True)
    saved = saved_by(lambda: torch.softmax(base[:, :6], -1))  # the input views a 160-byte storage
    assert saved.total_bytes == 4 * 6 * 4 == 96


def test_gelu_saves_its_input_counting_the_whole_storage_viewed():
    base = torch.randn(4, 10, requires_grad=True)
    saved = saved_by(lambda: F.gelu(base[:, :6]))
    assert saved.total_bytes == 4 * 10 * 4 == 160


def test_native_dropout_saves_a_one_byte_bool_mask():
    x = torch.randn(4, 6, requires_grad=True)
    saved = saved_by(lambda: torch.native_dropout(x, 0.1, True))
    assert saved.bytes_by_dtype == {torch.bool: 24}
    assert saved.count == 1


def test_functional_dropout_on_cpu_saves_the_mask_in_the_input_dtype():
    # On CUDA F.dropout calls native_dropout (bool mask); on CPU it multiplies by a mask tensor
    # of the input's dtype, 4 bytes per element here.
    x = torch.randn(4, 6, requires_grad=True)
    saved = saved_by(lambda: F.dropout(x, 0.1, training=True))
    assert saved.bytes_by_dtype == {torch.float32: 96}


def test_layernorm_saves_input_mean_and_rstd():
    ln = nn.LayerNorm(6)
    x = torch.randn(4, 6, requires_grad=True)
    saved = saved_by(lambda: ln(x), exclude=ln)
    assert saved.total_bytes == 4 * 6 * 4 + 2 * 4 * 1 * 4 == 128  # input + mean and rstd of shape (4, 1)
    assert saved.count == 3
    assert saved.excluded_bytes == 2 * 6 * 4  # weight and bias


def test_bf16_counts_two_bytes_per_element_and_cpu_layernorm_stats_are_bf16():
    lin = nn.Linear(IN, OUT, dtype=torch.bfloat16)
    ln = nn.LayerNorm(OUT, dtype=torch.bfloat16)
    x = torch.randn(B, IN, dtype=torch.bfloat16, requires_grad=True)
    saved = saved_by(lambda: ln(lin(x)), exclude=[*lin.parameters(), *ln.parameters()])
    # Linear input 15 + LayerNorm input 21 elements, and CPU LayerNorm keeps its (3, 1) mean and
    # rstd in bf16 (CUDA keeps them in fp32).
    assert saved.bytes_by_dtype == {torch.bfloat16: (B * IN + B * OUT + 2 * B) * 2} == {torch.bfloat16: 84}
    assert saved.excluded_bytes == (IN * OUT + 2 * OUT) * 2


def test_autocast_saves_bf16_copies_of_input_and_weight():
    lin = nn.Linear(IN, OUT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = saved_by(lambda: lin(torch.randn(B, IN, requires_grad=True)), exclude=lin)
    # The cached bf16 weight copy is not a parameter: it counts as saved, and nothing is excluded.
    assert saved.bytes_by_dtype == {torch.bfloat16: (B * IN + IN * OUT) * 2} == {torch.bfloat16: 100}
    assert saved.excluded_bytes == 0


# --- SavedTensorTracker: modules and recomputation --------------------------------------------


def test_attribution_to_innermost_tracked_module():
    width = 8
    model = nn.Sequential(Block(width), Block(width), nn.Linear(width, 2))
    modules = [("block0", model[0]), ("block1", model[1]), ("block1.proj", model[1].proj)]
    saved = saved_by(lambda: model(torch.randn(B, width)), exclude=model, modules=modules)
    act = B * width * 4
    # Each block saves fc input, GELU input and proj input; block1's proj input goes to the inner
    # module; the head's input (block1's output) is saved outside any tracked module.
    assert saved.bytes_by_module == {"block0": 3 * act, "block1": 2 * act, "block1.proj": act, "other": act}
    assert saved.total_bytes == 7 * act
    assert all(not m._forward_pre_hooks and not m._forward_hooks for _, m in modules)


def test_checkpointed_block_stores_only_its_input():
    width = 8
    block = Block(width)
    x = torch.randn(B, width, requires_grad=True)
    with SavedTensorTracker(exclude=block, modules=[("block", block)]) as plain:
        y_plain = block(x)
    with SavedTensorTracker(exclude=block, modules=[("block", block)]) as ckpt:
        y_ckpt = checkpoint(block, x, use_reentrant=False)
    act = B * width * 4
    assert plain.bytes_by_module == {"block": 3 * act}
    # checkpoint saves its inputs before the block's forward hooks run: they belong to "other".
    assert ckpt.bytes_by_module == {"other": act}
    assert ckpt.count == 1
    assert ckpt.excluded_bytes == 0  # the weights are re-read during recomputation, not saved
    (grad_plain,) = torch.autograd.grad(y_plain.sum(), x)
    (grad_ckpt,) = torch.autograd.grad(y_ckpt.sum(), x)
    torch.testing.assert_close(grad_ckpt, grad_plain)


def test_checkpoint_of_an_inner_function_drops_only_its_internals():
    # Megatron-style selective recompute: only the attention core runs under checkpoint.
    seq, width = 6, 8
    qkv, out = nn.Linear(width, width), nn.Linear(width, width)

    def core(q: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ q.t(), -1) @ q

    def forward(x: torch.Tensor, recompute: bool) -> torch.Tensor:
        q = qkv(x)
        return out(checkpoint(core, q, use_reentrant=False) if recompute else core(q))

    x = torch.randn(seq, width)
    params = [*qkv.parameters(), *out.parameters()]
    plain = saved_by(lambda: forward(x, recompute=False), exclude=params)
    selective = saved_by(lambda: forward(x, recompute=True), exclude=params)
    act, probs = seq * width * 4, seq * seq * 4
    assert plain.total_bytes == 3 * act + probs  # x, q, softmax output, core output
    assert selective.total_bytes == 3 * act  # x, q (the checkpoint input), core output
    assert selective.count == 3


def test_selective_checkpoint_policy_saves_are_invisible_to_saved_tensor_hooks():
    # SAC caches must-save outputs inside checkpoint, not through saved-tensor hooks: the
    # SavedTensorTracker sees only the checkpoint input, the LiveTensorTracker sees the cache.
    x = torch.randn(4, 8, requires_grad=True)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, x.t()).exp().sin()

    def save_mm(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    def run(context_fn):
        with LiveTensorTracker() as mem, SavedTensorTracker() as saved:
            y = checkpoint(fn, x, use_reentrant=False, context_fn=context_fn)
        return saved.total_bytes, mem.live_bytes - nbytes(y)

    full_saved, full_live = run(noop_context_fn)
    sac_saved, sac_live = run(lambda: create_selective_checkpoint_contexts(save_mm))
    assert full_saved == sac_saved == nbytes(x) == 128
    assert sac_live - full_live == 4 * 4 * 4  # the cached mm output


def test_saved_storage_freed_during_forward_is_released_and_its_reused_address_counts_anew():
    x = torch.randn(16, 16, requires_grad=True)
    collisions = 0
    for _ in range(20):
        seen = []
        with SavedTensorTracker() as saved:
            y = (x * 2).exp()  # exp saves its output
            seen.append(y.untyped_storage()._cdata)
            del y  # drops the graph: the saved output dies before backward
            zs = [x.exp() for _ in range(8)]
            seen += [z.untyped_storage()._cdata for z in zs]
        collisions += seen[0] in seen[1:]
        assert saved.count == 8
        assert saved.total_bytes == 8 * nbytes(x)
        assert saved.released_bytes == nbytes(x)
        if collisions:
            return
    pytest.skip("the allocator never reused a freed StorageImpl address in 20 tries; reuse path untested")


# --- LiveTensorTracker ----------------------------------------------------------------------------


def test_live_and_peak_follow_an_allocation_sequence():
    with LiveTensorTracker() as mem:
        a = torch.empty(100)
        assert (mem.live_bytes, mem.peak_bytes) == (400, 400)
        b = torch.empty(50, dtype=torch.float64)
        assert (mem.live_bytes, mem.peak_bytes) == (800, 800)
        a_view = a.view(10, 10).t()
        assert mem.live_bytes == 800
        del a
        assert mem.live_bytes == 800  # the view keeps the storage alive
        del a_view
        assert (mem.live_bytes, mem.peak_bytes) == (400, 800)
        c = torch.empty(10, dtype=torch.bfloat16)
        assert (mem.live_bytes, mem.peak_bytes) == (420, 800)
        mem.reset_peak()
        assert mem.peak_bytes == 420
        del b
        assert (mem.live_bytes, mem.peak_bytes) == (20, 420)
    del c
    assert mem.live_bytes == 0  # frees of registered storages are still counted after exit


def test_storage_growth_by_resize_and_out_is_measured():
    with LiveTensorTracker() as mem:
        a = torch.empty(10)
        a.resize_(100)
        assert (mem.live_bytes, mem.peak_bytes) == (400, 400)
        out = torch.empty(0)
        torch.add(a, a, out=out)
        assert (mem.live_bytes, mem.peak_bytes) == (800, 800)
        a.resize_(5)  # shrinking a tensor keeps its storage
        assert mem.live_bytes == 800


def test_track_registers_existing_tensors_and_ignores_untracked_ones():
    lin = nn.Linear(IN, OUT)
    x = torch.randn(B, IN)
    param_bytes = (IN * OUT + OUT) * 4
    with LiveTensorTracker() as mem:
        mem.track(*lin.parameters(), category="params")
        assert mem.snapshot() == {"params": param_bytes}
        x.t().add_(1)  # a view and an in-place op on an untracked tensor allocate nothing
        assert mem.live_bytes == param_bytes
        mem.track({"x": [x, x.view(-1)]}, category="input")
        assert mem.snapshot() == {"params": param_bytes, "input": B * IN * 4}
        mem.track(lin.bias, category="bias")  # relabels; counts nothing twice
        assert mem.snapshot() == {"params": IN * OUT * 4, "bias": OUT * 4, "input": B * IN * 4}
        assert mem.peak_bytes == param_bytes + B * IN * 4
    with pytest.raises(TypeError):
        mem.track(lin.parameters())  # a generator would otherwise be silently ignored


def mlp(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 8))


def test_backward_allocations_are_seen():
    model = mlp()
    x = torch.randn(4, 16)
    param_bytes = sum(nbytes(p) for p in model.parameters())
    with LiveTensorTracker() as mem:
        mem.track(*model.parameters(), category="params")
        mem.category = "forward"
        loss = model(x).pow(2).sum()
        forward_bytes = mem.snapshot()["forward"]
        mem.category = "backward"
        loss.backward()
        del loss
    # Alive after forward: the ReLU output (saved by ReLU and fc2), fc2's output (saved by pow)
    # and the 0-dim loss. fc1's output died once ReLU consumed it.
    assert forward_bytes == (4 * 32 + 4 * 8 + 1) * 4
    assert mem.snapshot() == {"params": param_bytes, "backward": param_bytes}  # exactly the gradients
    assert mem.peak_snapshot["backward"] > param_bytes


def allocator_peak(fn) -> tuple[int, int]:
    """Peak and final net bytes from the profiler's raw allocator events (independent of dispatch)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak, live


def test_mlp_forward_backward_peak_matches_profiler_allocator_events():
    model = mlp()
    x = torch.randn(4, 16)

    def step():
        model(x).pow(2).sum().backward()

    expected = allocator_peak(step)
    model.zero_grad(set_to_none=True)
    with LiveTensorTracker() as mem:
        step()
    assert (mem.peak_bytes, mem.live_bytes) == expected
    assert expected == (3752, 3232)


def test_training_step_peak_matches_memtracker():
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")  # private; absent in older torch
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(4, 16)

    def step():
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reference = mem_tracker.MemTracker()
    reference.track_external(model, optimizer)
    with reference:
        step()
    (peak,) = (snap["Total"] for snap in reference.get_tracker_snapshot("peak").values())
    (current,) = (snap["Total"] for snap in reference.get_tracker_snapshot("current").values())
    with LiveTensorTracker() as mem:
        mem.track(*model.parameters(), optimizer.state)
        step()
    assert (mem.peak_bytes, mem.live_bytes) == (peak, current)
    param_bytes = sum(nbytes(p) for p in model.parameters())
    n_params = len(list(model.parameters()))
    assert current == 3 * param_bytes + n_params * 4  # params, exp_avg, exp_avg_sq, a 0-dim fp32 step each


def test_fake_tensor_step_matches_real_tensors_byte_for_byte():
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 8))

    def measure(model: nn.Module, x: torch.Tensor) -> tuple:
        with LiveTensorTracker() as mem:
            mem.track(*model.parameters(), x, category="state")
            mem.category = "forward"
            with SavedTensorTracker(exclude=model) as saved:
                loss = model(x).float().pow(2).sum()
            mem.category = "backward"
            loss.backward()
            del loss
        return mem.live_bytes, mem.peak_bytes, mem.snapshot(), mem.peak_snapshot, saved.bytes_by_dtype

    default_dtype = torch.get_default_dtype()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            torch.set_default_dtype(dtype)
            real = measure(build(), torch.randn(4, 16))
            fake_mode = FakeTensorMode()
            with fake_mode:
                model, x = build(), torch.randn(4, 16)
            with fake_mode:  # entered first: the tracker inside it sees each op first
                fake = measure(model, x)
            assert fake == real
            assert real[2]["backward"] == real[2]["state"] - nbytes(x)  # the gradients
    finally:
        torch.set_default_dtype(default_dtype)


def test_a_storage_another_thread_frees_after_the_peak_is_counted_there():
    """A process group's worker thread (gloo's) can hold a collective's buffer after the step has dropped it:
    the free lands on that thread, counted under the tracker's lock, and the bytes that were live at the peak are
    `peak_backend_freed`. One allocated after the peak, or freed on the tracker's own thread, is not."""
    held: list[torch.Tensor] = []
    ready, stop = threading.Event(), threading.Event()

    def backend() -> None:
        refs = [held.pop(), held.pop()]  # the worker's own references; the step's are gone
        ready.set()
        stop.wait()
        del refs  # the last references: freed on this thread

    with LiveTensorTracker() as mem:
        late, mine = torch.ones(256), torch.ones(64)  # 1,024 B and 256 B, both live at the peak
        assert mem.peak_bytes == 1280
        del mine  # freed on the tracker's own thread
        after = torch.ones(32)  # 128 B, allocated after the peak (not a new one: 1,152 B live)
        held += [late, after]
        del late, after
        worker = threading.Thread(target=backend)
        worker.start()
        ready.wait()
        assert (mem.live_bytes, mem.peak_backend_freed) == (1152, 0)
        stop.set()
        worker.join()
    assert (mem.peak_bytes, mem.peak_backend_freed, mem.live_bytes) == (1280, 1024, 0)
    mem.reset_peak()
    assert mem.peak_backend_freed == 0
