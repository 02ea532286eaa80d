"""One rank of a layout measured on fake tensors in one process: the fake process group makes it rank R of N.

    python -m harness.plan.fakerank < request.json    # {"spec": RunSpec.to_dict(), "rank": R}

prints one JSON line: the rank's measured bytes (`harness.records.MemoryBytes`) and FLOPs, or {"error": ...}.
`harness.measure.measure` runs the single-process protocol on `--device meta` (`tmath plan --verify`); the
trainers' mesh is built with fake-tensor mode set aside (`harness.trainers.mesh.build_mesh`), and so are the
two things torch does inside: FSDP2's mesh concatenation and the pipeline schedules' warm-up vote (below).
DeepSpeed's engine runs too: its move to the device it is on is skipped, and the values its step reads back
are answered as a finite step answers them (below).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict


def _meshes_outside_fake_mode() -> None:
    """FSDP2 over a tensor-parallel mesh concatenates the dp and tp meshes while it shards (fake-tensor mode is
    on by then): the new mesh's rank tensor is made with fake-tensor mode set aside, as a real run makes it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    concatenate = DeviceMesh._concatenate

    def real(meshes):
        with unset_fake_temporarily():
            return concatenate(meshes)

    DeviceMesh._concatenate = staticmethod(real)


def _pipeline_without_warmup_vote() -> None:
    """torch.distributed.pipelining's P2P warm-up votes on an inference mode and reads the vote (`.item()`),
    which a fake tensor does not have: the stages are given the static mode (their shapes are known from the
    example micro-batch, `harness.trainers.pipeline`) without the vote."""
    try:
        from torch.distributed.pipelining import schedules
        from torch.distributed.pipelining._utils import InferenceMode
    except ImportError:  # an older torch without the vote
        return
    if not hasattr(schedules._PipelineSchedule, "_warmup_p2p"):
        return

    def static(self, stages, has_backward, p2p_done):
        for stage in stages:
            stage._inference_mode = InferenceMode.STATIC

    schedules._PipelineSchedule._warmup_p2p = static


def _same_device_moves_in_place() -> None:
    """DeepSpeed's engine moves the module to its device (`module.to(device)`); on fake tensors already there
    torch swaps each parameter for its own copy, which the live-bytes tracker's weak references forbid. A move
    to the device every tensor is on changes nothing in a real run: it is skipped."""
    import torch

    move = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], (str, torch.device)):
            device = torch.device(args[0])
            tensors = [*self.parameters(), *self.buffers()]
            if all(t.device.type == device.type for t in tensors):
                return self
        return move(self, *args, **kwargs)

    torch.nn.Module.to = to


def _deepspeed_reads_answered() -> None:
    """DeepSpeed's ZeRO step reads values back: whether any rank's gradients overflowed (`.item()` of an
    all-reduced flag), whether the gradient norm is finite, and (ZeRO-3) whether every rank traced the same
    module order (a broadcast from rank 0, compared). Fake tensors hold no values: each is answered as a finite
    step on identical ranks answers it (measured equal to real gloo ranks, tests/test_plan.py)."""
    try:
        from deepspeed.runtime.zero import partitioned_param_coordinator, stage3, stage_1_and_2
    except ImportError:
        return
    for optimizer in (stage_1_and_2.DeepSpeedZeroOptimizer, stage3.DeepSpeedZeroOptimizer_Stage3):
        optimizer.has_overflow = lambda self, *args, **kwargs: False
    for module in (stage_1_and_2, stage3):
        if hasattr(module, "is_invalid_grad_norm"):
            module.is_invalid_grad_norm = lambda norm: False
    partitioned_param_coordinator.assert_ints_same_as_other_ranks = lambda ints: None


def main() -> int:
    request = json.loads(sys.stdin.read())
    from formulas.spec import RunSpec
    from harness.errors import UsageError
    from harness.measure import measure
    from harness.records import Measurement
    from harness.trainers.mesh import init_fake_process_group

    spec = RunSpec.from_dict(request["spec"])
    measured = Measurement()
    try:
        if spec.parallel.gpus > 1:
            init_fake_process_group(int(request["rank"]), spec.parallel.gpus)
            _meshes_outside_fake_mode()
            _pipeline_without_warmup_vote()
            _same_device_moves_in_place()
            _deepspeed_reads_answered()
        measure(spec, measured)
    except UsageError as exc:
        print(json.dumps({"error": str(exc).splitlines()[0]}))
        return 2
    print(json.dumps({"memory_bytes": asdict(measured.memory_bytes), "flops_counted": measured.flops_counted}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
