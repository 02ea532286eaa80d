"""The cause of each named departure of a real implementation from the paper's activation count, one line each.

`formulas.variants` computes the departures; this is what they are called and why they happen (the README's
table of findings and the reports quote it).
"""

from __future__ import annotations

CAUSES: dict[str, str] = {
    "norm_stats": "norm statistics per token: LayerNorm mean and 1/std (CPU: input dtype; CUDA: fp32), "
    "RMSNorm 1/rms (fp32); the paper leaves them out",
    "no_residual_dropout": "transformers Llama has no residual dropout (`attention_dropout` only): no 2·sbh masks",
    "dropout_mask_dtype": "CPU `F.dropout` multiplies by a noise tensor of the input dtype "
    "(ATen Dropout.cpp `_dropout_impl`): m = e instead of a 1-byte bool",
    "parallel_residual": "GPT-NeoX parallel residual: both norms read the same input, stored once",
    "rmsnorm_fp32_input": "transformers `LlamaRMSNorm` upcasts its input to fp32 and keeps the copy",
    "rmsnorm_saves_output": "transformers `LlamaRMSNorm` keeps the normalised input for the weight's gradient",
    "rmsnorm_fp32_weight": "transformers `GemmaRMSNorm` keeps the fp32 (1 + weight) it scales by (4·h per norm)",
    "gelu_new": "`NewGELUActivation` (GPT-2 `gelu_new`) is composed of pow/tanh/mul: "
    "keeps 3 more s·b·f tensors (tanh, 0.5·x, 1 + tanh)",
    "repeat_kv": "`repeat_kv` materialises K and V at all a heads",
    "softmax_fp32": "eager softmax in fp32 (`dtype=torch.float32`) then `.to(query.dtype)`: "
    "an fp32 a·s² tensor (and its e copy without dropout)",
    "sdpa_math_fallback": "CPU SDPA with dropout falls back to `_scaled_dot_product_attention_math`, "
    "in fp32 for 16-bit inputs: Q, K, V copies and softmax, mask, dropout output at 4 bytes",
    "sdpa_value_keeps_qkv": "GPT-NeoX, Phi-3: V is a chunk of the fused QKV output; SDPA saving V keeps the whole "
    "e·sb·(a·d + 2·kv_width) storage",
    "sdpa_output_copy": "GPT-NeoX, Phi-3: SDPA's head-major output and its (b, s, h) contiguous copy are both kept",
    "sdpa_fake_mask": "fake tensors only: transformers `find_packed_sequence_indices` cannot read them, "
    "builds a (b, 1, s, s) mask; CPU SDPA saves it in the query dtype every layer",
    "moe_fp32_routing_weights": "MixtralExperts multiplies each routed row by the router's fp32 weight "
    "(transformers.integrations.moe grouped_mm): 4 bytes per row, not e",
    "rotary_tables": "transformers computes RoPE cos and sin per forward (1, s, rot) in e; kept once, "
    "charged to the first layer",
    "checkpoint_mask": "transformers GPT-2 passes its attention mask positionally to the checkpointed block: "
    "kept once, charged to the first layer",
}
"""One line per departure: its cause (the README's table column)."""
