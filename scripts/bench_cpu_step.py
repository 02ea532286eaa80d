"""How close the harness's training step comes to the CPU's own matmul throughput, measured in one run.

    .venv/bin/python scripts/bench_cpu_step.py [--layers 4] [--seq 512] [--batch 4] [--steps 3] [--no-compile]
        [--out results/bench/cpu-step.json]

1. The ceiling: every GEMM of one training step of the model, timed alone at the step's own shapes and
   layouts (each linear layer's forward, its input gradient and its weight gradient, with the transposed
   views autograd uses; attention's two batched matmuls and their four gradients; the tied LM head), in
   fp32 on the threads torch uses, each at its best of two runs. FLOPs over seconds of the whole mix.
2. The step: the harness's plain trainer (`harness.trainers.plain`, what `tmath measure --model gpt2
   --layers 4 --seq 512 --precision fp32 --device cpu` times), eager, after `compile()` (`--compile`:
   torch.compile of the model and its loss, fused AdamW), and compiled with GPT-2's dropout (0.1) set to 0
   (what the dropout masks' random numbers cost). Two untimed steps (the first compiles), then timed ones.
3. The ratio: each timed step runs between two ceiling passes, and its matmul FLOPs (the formulas' exact
   count, equal to what FlopCounterMode counts) over its time, divided by the ceiling of the passes on
   either side, is its share of the machine's matmul speed as the machine was then: a shared VM's clock
   and neighbours move by tens of percent within minutes. The median over the steps is printed.
   What is not matmul (softmax, GELU, LayerNorm, dropout, the loss, AdamW) is the rest.

Prints a line per mode and, with --out, writes every step's numbers as JSON with the environment. Not a
test: run it on a quiet machine.
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

from formulas.predict import predict
from harness.environment import environment
from harness.schema import to_json
from harness.specbuild import build_spec
from harness.trainers.plain import PlainTrainer
from models.build import build_model, make_batch


def _best(fn, repeats: int) -> float:
    """Fastest seconds of `fn()` over `repeats` calls, after one warm-up call: a ceiling takes the best."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def step_gemms(arch, batch: int, seq: int) -> list[tuple[str, object, int, int]]:
    """(name, a function that runs one matmul as autograd runs it, its FLOPs, count per step) for every
    matmul of one training step.

    Per linear layer (weight W: [out, in], as nn.Linear stores it) over T = b·s tokens: forward
    x[T, in] @ Wᵀ, input gradient g[T, out] @ W, weight gradient gᵀ @ x (transposed views, no copies).
    Attention per layer over b·a heads of size d: scores q @ kᵀ and context p @ v forward, and the two
    gradients of each (the same shapes, transposed operands).
    """
    h, f, v, L = arch.hidden, arch.ffn_hidden, arch.vocab, arch.n_layers
    a, tokens = arch.n_heads, batch * seq
    d, heads = h // a, batch * a
    linears = [("qkv", h, 3 * h, L), ("attn out", h, h, L), ("mlp up", h, f, L), ("mlp down", f, h, L),
               ("lm head", h, v, 1)]  # fmt: skip
    out = []
    for name, i, o, n in linears:
        x, w, g = torch.randn(tokens, i), torch.randn(o, i), torch.randn(tokens, o)
        flops = 2 * tokens * i * o
        out += [(f"{name} fwd", lambda x=x, w=w: x @ w.t(), flops, n), (f"{name} dX", lambda g=g, w=w: g @ w, flops, n),
                (f"{name} dW", lambda g=g, x=x: g.t() @ x, flops, n)]  # fmt: skip
    q, k, p = torch.randn(heads, seq, d), torch.randn(heads, seq, d), torch.randn(heads, seq, seq)
    flops = 2 * heads * seq * seq * d
    out += [("scores fwd", lambda: q @ k.transpose(1, 2), flops, L), ("context fwd", lambda: p @ k, flops, L),
            ("scores dq", lambda: p @ k, flops, L), ("scores dk", lambda: p.transpose(1, 2) @ q, flops, L),
            ("context dp", lambda: q @ k.transpose(1, 2), flops, L), ("context dv", lambda: p.transpose(1, 2) @ q,
            flops, L)]  # fmt: skip
    return out


def ceiling_pass(gemms, tries: int = 2) -> dict[str, float]:
    """Best seconds of each of the step's matmuls over `tries` runs (the first warms it)."""
    return {name: _best(fn, tries - 1) for name, fn, _, _ in gemms}


def mix_tflops(gemms, *passes: dict[str, float]) -> float:
    """FLOP/s of the step's GEMM mix, each matmul at its best time over the given passes."""
    flops = sum(n * f for _, _, f, n in gemms)
    seconds = sum(n * min(p[name] for p in passes) for name, _, _, n in gemms)
    return flops / seconds / 1e12


def trainer_for(spec, compiled: bool) -> tuple[PlainTrainer, list[dict], str]:
    """The harness's plain trainer on the spec's model (`harness.measure` builds the same), eager or after
    `compile()`."""
    torch.manual_seed(0)
    arch, t = spec.model.arch, spec.training
    model = build_model(arch, impl="reference", attention=t.attention, recompute=t.recompute, device="cpu",
                        dtype=torch.float32)  # fmt: skip
    batches = [make_batch(arch, t.batch, t.seq, device="cpu", generator=torch.Generator().manual_seed(0))]
    trainer = PlainTrainer(model, spec, device_type="cpu")
    return trainer, batches, trainer.compile() if compiled else "eager"


def run_mode(spec, compiled: bool, gemms, steps: int, flops: int) -> dict:
    """Warm-up, then `steps` timed steps, each between two ceiling passes: the ratio of each step is its
    matmul FLOP/s over the ceiling of the passes on either side of it (the machine as it was then)."""
    trainer, batches, how = trainer_for(spec, compiled)
    t0 = time.perf_counter()
    trainer.train_step(batches)  # the compiling step when compiled
    first_s = time.perf_counter() - t0
    trainer.train_step(batches)
    passes, times = [ceiling_pass(gemms)], []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - t0)
        passes.append(ceiling_pass(gemms))
    ceilings = [mix_tflops(gemms, passes[i], passes[i + 1]) for i in range(steps)]
    ratios = [flops / t / 1e12 / c for t, c in zip(times, ceilings, strict=True)]
    return {"step_mode": how, "first_step_s": first_s, "step_s": times, "ceiling_tflops": ceilings,
            "step_tflops_matmul": [flops / t / 1e12 for t in times], "ratios": ratios,
            "ratio": statistics.median(ratios)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="the eager step only")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = ap.parse_args(argv)
    base = {"model": "gpt2", "layers": args.layers, "seq": args.seq, "batch": args.batch, "precision": "fp32",
            "device": "cpu"}  # fmt: skip
    spec = build_spec(base)
    flops = predict(spec).flops.per_step_matmul
    print(f"gpt2 · {args.layers} layers · s={args.seq} · b={args.batch} · fp32 · {torch.get_num_threads()} threads · "
          f"{flops / 1e9:,.1f} GFLOP of matmuls per step")  # fmt: skip
    gemms = step_gemms(spec.model.arch, args.batch, args.seq)
    modes = {"eager": (spec, False)}
    if not args.no_compile:
        modes |= {"compile": (spec, True), "compile, no dropout": (build_spec({**base, "dropout": 0.0}), True)}
    runs = {}
    for mode, (s, compiled) in modes.items():
        r = runs[mode] = run_mode(s, compiled, gemms, args.steps, flops)
        print(f"{mode:>19}: step {statistics.median(r['step_s']) * 1e3:,.0f} ms (median of {args.steps}), matmul "
              f"{statistics.median(r['step_tflops_matmul']) * 1e3:,.1f} GFLOP/s against a ceiling of "
              f"{statistics.median(r['ceiling_tflops']) * 1e3:,.1f}: {r['ratio']:.1%} (median of the steps' "
              f"ratios {', '.join(f'{x:.1%}' for x in r['ratios'])}) · {r['step_mode']}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"spec": spec.to_dict(), "threads": torch.get_num_threads(), "matmul_flops_per_step": flops,
               "gemms": [{"gemm": name, "flops": f, "per_step": n} for name, _, f, n in gemms], "runs": runs,
               "environment": to_json(environment(device="cpu", argv=sys.argv))}  # fmt: skip
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
