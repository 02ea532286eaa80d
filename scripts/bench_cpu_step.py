"""How close the harness's training step comes to the CPU's own matmul throughput, measured in one run.

    .venv/bin/python scripts/bench_cpu_step.py [--layers 4] [--seq 512] [--batch 4] [--steps 3] [--no-compile]
        [--out results/bench/cpu-step.json]

1. The ceiling: every GEMM of one training step of the model, timed alone with `torch.mm`/`torch.bmm` at
   the step's own shapes (each linear layer's forward, its input gradient and its weight gradient, with the
   transposes autograd uses; attention's two batched matmuls and their four gradients; the tied LM head),
   in the step's dtype (fp32), on the threads torch uses. FLOPs over seconds of the whole mix.
2. The step: `harness.measure.measure` on the same spec (`tmath measure --model gpt2 --layers 4 --seq 512
   --precision fp32 --device cpu`), eager, with `--compile`, and with `--compile` and GPT-2's dropout (0.1)
   set to 0 (what the dropout masks' random numbers cost); its step time is the median of the timed steps,
   FLOPs those FlopCounterMode counted (the exact matmul count).
3. The ratio: (matmul FLOPs per step / step time) / ceiling: the share of the machine's matmul speed that
   the step keeps. What is not matmul (softmax, GELU, LayerNorm, dropout, the loss, AdamW) is the rest.

Prints a table and, with --out, writes the numbers as JSON with the environment. Not a test: a CPU shared
with other work gives other numbers; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.environment import environment
from harness.measure import measure
from harness.schema import to_json
from harness.specbuild import build_spec


def _time(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_gemms(arch, batch: int, seq: int) -> list[tuple[str, tuple, tuple, int]]:
    """(name, shape A, shape B, count per step) of every matmul of one training step, A @ B.

    Per linear layer (in → out) over T = b·s tokens: forward [T, in] @ [in, out], input gradient
    [T, out] @ [out, in], weight gradient [out, T] @ [T, in]. Attention per layer, over b·a heads of size d:
    scores [s, d] @ [d, s], context [s, s] @ [s, d], and two gradients of each of the same shapes.
    """
    h, f, v, L = arch.hidden, arch.ffn_hidden, arch.vocab, arch.n_layers
    a, tokens = arch.n_heads, batch * seq
    d, heads = h // a, batch * a
    linears = [("qkv", h, 3 * h, L), ("attn out", h, h, L), ("mlp up", h, f, L), ("mlp down", f, h, L),
               ("lm head", h, v, 1)]  # fmt: skip
    out = []
    for name, i, o, n in linears:
        out += [(f"{name} fwd", (tokens, i), (i, o), n), (f"{name} dX", (tokens, o), (o, i), n),
                (f"{name} dW", (o, tokens), (tokens, i), n)]  # fmt: skip
    out += [("scores fwd", (heads, seq, d), (heads, d, seq), L), ("context fwd", (heads, seq, seq), (heads, seq, d), L),
            ("scores bwd", (heads, seq, seq), (heads, seq, d), 2 * L),
            ("context bwd", (heads, seq, d), (heads, d, seq), 2 * L)]  # fmt: skip
    return out


def matmul_ceiling(arch, batch: int, seq: int, repeats: int) -> dict:
    """FLOP/s of the step's GEMM mix, each shape timed alone (weighted by its count per step)."""
    flops = seconds = 0.0
    rows = []
    for name, sa, sb, n in step_gemms(arch, batch, seq):
        x, y = torch.randn(*sa), torch.randn(*sb)
        op = torch.bmm if len(sa) == 3 else torch.mm
        s = _time(lambda op=op, x=x, y=y: op(x, y), repeats)
        f = 2 * x.numel() * sb[-1]  # 2·m·k·n (batched: ·heads)
        flops, seconds = flops + n * f, seconds + n * s
        rows.append({"gemm": name, "a": list(sa), "b": list(sb), "per_step": n, "tflops": f / s / 1e12})
    square = torch.randn(2048, 2048)
    s = _time(lambda: square @ square, repeats)
    return {"tflops": flops / seconds / 1e12, "flops": flops, "seconds": seconds, "square_2048_tflops":
            2 * 2048**3 / s / 1e12, "gemms": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="timings of each GEMM shape")
    ap.add_argument("--no-compile", action="store_true", help="the eager step only")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = ap.parse_args(argv)
    base = {"model": "gpt2", "layers": args.layers, "seq": args.seq, "batch": args.batch, "precision": "fp32",
            "device": "cpu", "steps": args.steps, "warmup": 1}  # fmt: skip
    spec = build_spec(base)
    arch = spec.model.arch
    print(f"gpt2 · {args.layers} layers · s={args.seq} · b={args.batch} · fp32 · {torch.get_num_threads()} threads")
    ceiling = matmul_ceiling(arch, args.batch, args.seq, args.repeats)
    print(f"matmul ceiling (the step's GEMMs alone): {ceiling['tflops'] * 1e3:,.1f} GFLOP/s "
          f"(square 2048 GEMM: {ceiling['square_2048_tflops'] * 1e3:,.1f})")  # fmt: skip
    runs = {}
    modes = {"eager": {}} if args.no_compile else {"eager": {}, "compile": {"compile": True},
                                                    "compile, no dropout": {"compile": True, "dropout": 0.0}}  # fmt: skip
    for mode, change in modes.items():
        m = measure(build_spec({**base, **change}))
        seconds = m.step_ms.median / 1e3
        achieved = m.flops_counted / seconds / 1e12
        runs[mode] = {"step_ms": m.step_ms.median, "step_ms_all": m.step_ms.all, "matmul_flops": m.flops_counted,
                      "tflops_matmul": achieved, "tflops_model": m.tflops.model, "ratio": achieved / ceiling["tflops"],
                      "step_mode": m.step_mode, "compile_seconds": m.compile_seconds}  # fmt: skip
        print(f"{mode:>19}: step {m.step_ms.median:,.0f} ms (median of {len(m.step_ms.all)}), matmul "
              f"{achieved * 1e3:,.1f} GFLOP/s = {runs[mode]['ratio']:.1%} of the ceiling ({m.step_mode})")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"spec": spec.to_dict(), "threads": torch.get_num_threads(), "ceiling": ceiling, "runs": runs,
               "environment": to_json(environment(device="cpu", argv=sys.argv))}  # fmt: skip
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
