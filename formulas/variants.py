"""Activation bytes of real implementations: where transformers, torch's kernels and SDPA depart from the paper.

`formulas.activations` counts what Korthikanti et al. 2022 (arXiv:2205.05198, Table 2) count, per tensor,
and the reference models in `models/` are written to store exactly that. The transformers models and
torch's CPU kernels store other tensors. This module names each departure, gives its size per tensor,
and says why, with the transformers function or torch op that causes it and the measurement that shows
it. The measured numbers are in `results/departures/runs.jsonl` (sweep file `sweeps/departures.yaml`);
`tests/test_variants.py` checks every formula here against saved-tensor bytes to the byte.

    variant = activation_variant(arch, impl="hf", precision="bf16", attention="eager", device="cpu")
    account = layer_account(arch, seq, batch, variant)   # the paper's bytes plus named departures
    account.paper, account.departures, account.per_layer, account.layers(arch.n_layers)

Per layer, with e bytes per activation, m per dropout-mask element, f = ffn_hidden, kv = kv_width, and
S = a·s²·b attention-score elements, the departures are (each is a field of `ActivationVariant`):

    norm_stats            each norm's per-token statistics: LayerNorm mean and 1/std, RMSNorm 1/rms
    mask_bytes            F.dropout on CPU keeps its mask in the input dtype (m = e), not a 1-byte bool
    residual_dropouts     transformers Llama drops only the attention scores: no residual-branch masks
    parallel_residual     GPT-NeoX: both norms read the same input, stored once (−e·sbh)
    norm_input_bytes      transformers' RMSNorm upcasts its input: 4·sbh per norm whatever e
    norm_saves_output     transformers' RMSNorm also keeps the normalised input for the weight's gradient
    extra_inner_tensors   GPT-2's tanh GeLU (`gelu_new`) keeps 3 more s·b·f tensors
    kv_materialised       `repeat_kv` copies K and V to all a heads: 2e·s·b·(h − kv) more
    softmax_fp32          GPT-NeoX and Llama eager softmax in fp32 and keep an e copy: (4 − e)·S (+ e·S)
    sdpa_kernel           `math`: CPU SDPA with dropout runs the unfused math path in fp32:
                          Q, K, V at 4 bytes and three fp32 a·s² tensors (softmax, mask, dropout output)
    sdpa_value_keeps_qkv  GPT-NeoX, Phi-3: V is a view of the fused QKV output, so SDPA keeps all of it
    sdpa_output_copy      GPT-NeoX, Phi-3: the kernel's (b, a, s, d) output and its (b, s, h) copy are both kept
    sdpa_mask_bytes       fake tensors only: transformers builds an explicit (b, 1, s, s) causal mask,
                          which CPU SDPA converts to the query dtype and saves, every layer
    rotary_dims           transformers computes cos and sin per forward (2e·s·rot bytes, kept once)
    checkpoint_mask_bytes transformers GPT-2 passes its mask to the checkpointed block: kept once

Precision. e is 2 for fp16/bf16, pure or mixed, 4 for fp32. Under CPU autocast (bf16-mixed on `cpu` or
`meta`) every layer stores what pure bf16 stores, to the byte (CPU autocast keeps layer_norm and softmax in
bf16); only the loss moves: autocast runs cross_entropy in fp32, which transformers BERT otherwise runs on
bf16 logits (`OutsideAccount`).

Devices. `cuda` and `cpu` are real tensors; `meta` is the harness's `--device meta` (fake tensors with
CPU kernels), which is CPU plus what transformers does when it sees a fake tensor. Everything this module
says about `cpu` and `meta` was measured here (torch 2.13 CPU, transformers 5.23). No GPU was lent to
this work: for `cuda` the variant keeps the device-independent departures (the Python code of the
transformers models) and takes the kernel choices from torch's source, and lists what that assumes in
`ActivationVariant.unmeasured`. Under autocast on CUDA, layer_norm, softmax, pow and rsqrt run in fp32
(torch.amp's CUDA op reference); that changes which copies are saved and is not modelled: a
`device="cuda"` variant with mixed precision raises `ValueError` until it is measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from formulas import activations as act
from formulas.architecture import Architecture
from formulas.families import code_family
from formulas.finetune import first_block_note, lora_implementation
from formulas.layouts import INDEX_BYTES, NEOX_ROTARY_FRACTION
from formulas.precision import activation_bytes_per_element, is_mixed
from formulas.spec import IMPLS, MEASURED_DEVICES, RunSpec

FP32_BYTES = 4
"""Bytes of the fp32 tensors that kernels keep whatever the activation dtype (statistics, upcasts)."""

SDPA_GQA_MAX_HEAD_DIM = 256
"""transformers `use_gqa_in_sdpa`: SDPA gets `enable_gqa` only without a mask and for head_dim <= 256."""


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class ActivationVariant:
    """What one implementation on one device stores, as choices that depart from Korthikanti's count.

    The defaults are the paper (with the norm statistics it leaves out at 0 bytes); each field is one
    measured departure (module doc; its cause in `formulas.departures.CAUSES`).
    """

    model: str
    """`reference` (models/gpt.py, models/bert.py) or the transformers type: gpt2, gpt_neox, llama, bert."""
    device: str
    """cuda | cpu | meta (fake tensors, CPU kernels)."""
    attention: str
    """eager | flash (`formulas.activations.ATTENTIONS`)."""
    recompute: str
    """none | selective | full (`formulas.activations.RECOMPUTES`)."""
    elem_bytes: int
    """e: bytes of one activation element (2 for fp16/bf16, pure or mixed; 4 for fp32)."""
    mask_bytes: int = 1
    """Bytes per dropout-mask element: 1 for `native_dropout` (and `F.dropout` on CUDA), e for `F.dropout` on CPU."""
    stats_bytes: int = 0
    """Bytes per norm statistic per token (LayerNorm 2 per token, RMSNorm 1)."""
    residual_dropouts: int = 2
    """Residual-branch dropouts per layer (the paper's two 1-byte s·b·h masks)."""
    parallel_residual: bool = False
    """Both norms of a layer read the same input (GPT-NeoX `use_parallel_residual`): one norm input stored."""
    norm_input_bytes: int | None = None
    """Bytes per element of a stored norm input; None means e."""
    norm_saves_output: bool = False
    """The norm also keeps its normalised input (transformers `LlamaRMSNorm`: `weight * x.to(dtype)`)."""
    norm_output_bytes: int = 0
    """Bytes per element of that normalised input where it is not e: Gemma's RMSNorm multiplies in fp32 (4)."""
    norm_weight_copy: bool = False
    """Gemma's RMSNorm keeps the fp32 (1 + weight) it scales by: 4·h bytes per norm, per forward."""
    extra_inner_tensors: int = 0
    """s·b·f tensors kept beyond the activation's input and output (GPT-2 `gelu_new`: 3)."""
    kv_materialised: bool = False
    """K and V are copied to all a query heads before attention (`repeat_kv`)."""
    softmax_fp32: bool = False
    """Eager softmax runs in fp32 and is cast back to e (GPT-NeoX, Llama)."""
    sdpa_kernel: str = "none"
    """`none` (eager), `flash` (a fused kernel: no a·s² tensor, fp32 log-sum-exp) or `math` (CPU fallback)."""
    sdpa_value_keeps_qkv: bool = False
    """V is a view of the fused QKV output, so the kernel keeps the whole QKV storage."""
    sdpa_output_copy: bool = False
    """The kernel's output is head-major and the block keeps its (b, s, h) copy as well."""
    sdpa_mask_bytes: int = 0
    """Bytes per element of a (b, 1, s, s) attention mask the kernel saves, every layer (0: none)."""
    rotary_dims: int = 0
    """Per-forward RoPE tables (cos, sin of s × rotary_dims) kept once (0: none, or buffers)."""
    checkpoint_mask_bytes: int = 0
    """Bytes per element of a (b, 1, s, s) mask that full recomputation keeps once (0: none)."""
    routing_weight_bytes: int = 0
    """Bytes of each routed row's weight where they are not e (Mixtral keeps the router's fp32); 0: e."""
    loss_logit_bytes: int = act.LOSS_LOGIT_BYTES
    """Bytes per element of the log-softmax the loss keeps (fp32; transformers BERT: the model dtype)."""
    position_ids_saved: bool = False
    """The position embedding saves int64 position ids (transformers GPT-2) instead of reading a buffer."""
    unmeasured: tuple[str, ...] = field(default_factory=tuple)
    """Assumptions taken from source code, not measured in this repository (CUDA)."""

    @property
    def norm_element_bytes(self) -> int:
        return self.elem_bytes if self.norm_input_bytes is None else self.norm_input_bytes


def activation_variant(
    arch: Architecture,
    *,
    impl: str = "reference",
    precision: str = "bf16",
    attention: str = "eager",
    recompute: str = "none",
    device: str = "cuda",
) -> ActivationVariant:
    """The departures of `impl` on `device` (module doc); raises ValueError for what is not modelled."""
    _check("impl", impl, IMPLS)
    _check("device", device, MEASURED_DEVICES)
    _check("attention", attention, act.ATTENTIONS)
    _check("recompute", recompute, act.RECOMPUTES)
    e = activation_bytes_per_element(precision)
    if device == "cuda" and is_mixed(precision):
        raise ValueError(
            "CUDA autocast keeps layer_norm, softmax, pow and rsqrt in fp32 (torch.amp op reference); "
            "this has not been measured here (no GPU): no variant for device cuda with mixed precision"
        )
    cpu = device in ("cpu", "meta")
    fake = device == "meta"
    dropout = arch.dropout > 0
    # LayerNorm statistics: ATen layer_norm.cpp keeps mean/rstd in the input dtype on CPU; the CUDA kernel
    # (layer_norm_kernel.cu) in the accumulate type, fp32. Both RMSNorms keep an fp32 1/rms.
    stats = FP32_BYTES if (arch.norm == "rmsnorm" or not cpu) else e
    unmeasured: list[str] = []
    if device == "cuda":
        unmeasured.append("no GPU run checks this variant yet: its device-independent terms were measured on CPU")
    if device == "cuda" and arch.norm != "rmsnorm":
        unmeasured.append("LayerNorm statistics in fp32 (CUDA layer_norm kernel, accumulate type)")
    # The score-dropout path decides the SDPA kernel: CPU has no fused kernel with dropout.
    kernel = "none"
    if attention == "flash" and recompute == "none":
        kernel = "math" if (cpu and dropout) else "flash"
        if device == "cuda":
            unmeasured.append("SDPA on CUDA runs a fused kernel keeping Q, K, V, the output and an fp32 log-sum-exp")
    if impl == "reference":
        return ActivationVariant(
            model="reference",
            device=device,
            attention=attention,
            recompute=recompute,
            elem_bytes=e,
            stats_bytes=stats,
            sdpa_kernel=kernel,
            unmeasured=tuple(unmeasured),
        )

    if recompute == "selective":
        raise ValueError("transformers has no selective recomputation (models.hf.build_hf)")
    family = code_family(arch)
    # F.dropout: ATen Dropout.cpp uses the fused native_dropout (1-byte bool mask) only on CUDA-like devices.
    mask = e if cpu else 1
    if device == "cuda" and dropout:
        unmeasured.append("F.dropout on CUDA saves a 1-byte bool mask (ATen Dropout.cpp is_fused_kernel_acceptable)")
    causal = arch.family == "decoder"
    # transformers masking_utils: with real tensors and no padding, SDPA gets is_causal and no mask; a fake
    # tensor counts as tracing, so `find_packed_sequence_indices` assumes packing and a mask is built.
    sdpa_mask = kernel == "flash" and fake and causal
    gqa = arch.n_kv_heads != arch.n_heads
    sdpa_repeats_kv = kernel == "flash" and gqa and (sdpa_mask or arch.head_size > SDPA_GQA_MAX_HEAD_DIM)
    if device == "cuda" and family == "gpt_neox" and kernel == "flash":
        unmeasured.append("SDPA on CUDA returns a head-major output for head-major Q, as the CPU kernel does")
    kw: dict = {
        "model": family,
        "device": device,
        "attention": attention,
        "recompute": recompute,
        "elem_bytes": e,
        "mask_bytes": mask,
        "stats_bytes": stats,
        "sdpa_kernel": kernel,
        "sdpa_mask_bytes": e if sdpa_mask else 0,
        "unmeasured": tuple(unmeasured),
    }
    if family == "gpt2":
        kw.update(extra_inner_tensors=3, position_ids_saved=True)
        if recompute == "full":
            # eager: the float mask in the model dtype; SDPA: a bool mask, built only under fake tensors.
            kw["checkpoint_mask_bytes"] = e if attention == "eager" else (1 if fake else 0)
    elif family == "gpt_neox":
        kw.update(
            parallel_residual=True,
            softmax_fp32=attention == "eager",
            sdpa_value_keeps_qkv=kernel == "flash",
            sdpa_output_copy=kernel == "flash",
            rotary_dims=int(arch.head_size * NEOX_ROTARY_FRACTION),
        )
    elif family == "llama":
        kw.update(
            residual_dropouts=0,
            norm_input_bytes=FP32_BYTES,
            norm_saves_output=True,
            kv_materialised=gqa and (attention == "eager" or sdpa_repeats_kv),
            softmax_fp32=attention == "eager",
            rotary_dims=arch.head_size,
            # MixtralExperts scales each row by the router's fp32 weight (Qwen2-MoE casts it to the model dtype).
            routing_weight_bytes=FP32_BYTES if arch.model_type == "mixtral" else 0,
            # GemmaRMSNorm: norm(x.float()) * (1.0 + weight.float()), cast back after the product.
            norm_output_bytes=FP32_BYTES if arch.model_type == "gemma" else 0,
            norm_weight_copy=arch.model_type == "gemma",
            # Phi-3's fused qkv_proj: under SDPA, V (a view of its output) keeps the whole of it, and the
            # kernel's output is copied for o_proj (as GPT-NeoX's).
            sdpa_value_keeps_qkv=arch.model_type == "phi3" and kernel == "flash" and not sdpa_repeats_kv,
            sdpa_output_copy=arch.model_type == "phi3" and kernel == "flash",
        )
    elif not is_mixed(precision):
        # bert: BertForPreTraining's CrossEntropyLoss runs on logits in the model dtype; autocast (CPU, measured)
        # runs cross_entropy in fp32.
        kw["loss_logit_bytes"] = e
    return ActivationVariant(**kw)


@dataclass(frozen=True)
class LayerAccount:
    """One layer's stored bytes: the paper's count plus each named departure (bytes, signed)."""

    paper: int
    """Korthikanti et al. Table 2, generalised: `formulas.activations.layer_bytes(e, m=1)`."""
    departures: dict[str, int]
    """Every layer: departure name (a key of `formulas.departures.CAUSES`) → bytes added (negative: removed)."""
    shared: dict[str, int]
    """Kept once per forward, charged to the first layer that saves it (per-forward tables, masks)."""

    @property
    def per_layer(self) -> int:
        """Bytes of every layer but the first."""
        return self.paper + sum(self.departures.values())

    @property
    def first_layer(self) -> int:
        return self.per_layer + sum(self.shared.values())

    def layers(self, n_layers: int) -> list[int]:
        """Bytes per layer as `measure` attributes them (`activations_by_layer`)."""
        return [self.first_layer] + [self.per_layer] * (n_layers - 1)

    def total(self, n_layers: int) -> int:
        return sum(self.layers(n_layers))


def layer_account(arch: Architecture, seq: int, batch: int, variant: ActivationVariant) -> LayerAccount:
    """The paper's per-layer bytes for one micro-batch and the variant's departures, tensor by tensor."""
    e, v = variant.elem_bytes, variant
    attention, recompute = variant.attention, variant.recompute
    s, b, h, a, kv, f = seq, batch, arch.hidden, arch.n_heads, arch.kv_width, arch.ffn_hidden
    sbh, scores, bss = s * b * h, a * s * s * b, b * s * s
    paper = act.layer_bytes(arch, s, b, elem_bytes=e, mask_bytes=1, recompute=recompute, attention=attention)
    dep: dict[str, int] = {}
    shared: dict[str, int] = {}

    def add(name: str, nbytes: int, into: dict[str, int] = dep) -> None:
        if nbytes:
            into[name] = into.get(name, 0) + nbytes

    if recompute == "full":
        # Only the block input (the paper's 2·sbh in 16 bits), plus what the checkpoint call is given.
        add("checkpoint_mask", v.checkpoint_mask_bytes * bss, shared)
        return LayerAccount(paper, dep, shared)

    dropout = arch.dropout > 0
    with_stats = arch.norms_per_layer + act.qk_norm_count(arch)  # block norms and QK-norms
    add("norm_stats", with_stats * arch.norm_statistics * s * b * v.stats_bytes)
    qk = (arch.q_width + arch.kv_width) * s * b if arch.qk_norm != "none" else 0  # QK-norm inputs, per element
    if dropout:
        add("no_residual_dropout", -(2 - v.residual_dropouts) * sbh)
        score_masks = scores if (recompute == "none" and v.sdpa_kernel == "none") else 0
        add("dropout_mask_dtype", (v.mask_bytes - 1) * (v.residual_dropouts * sbh + score_masks))
    if v.parallel_residual:
        add("parallel_residual", -v.norm_element_bytes * sbh)
    norms = 1 if v.parallel_residual else 2
    add("rmsnorm_fp32_input", (v.norm_element_bytes - e) * (norms * sbh + qk))
    if v.norm_saves_output:
        add("rmsnorm_saves_output", (v.norm_output_bytes or e) * (2 * sbh + qk))
    if v.norm_weight_copy:
        add("rmsnorm_fp32_weight", arch.norms_per_layer * FP32_BYTES * h)
    add("gelu_new", v.extra_inner_tensors * e * s * b * f)
    q = arch.q_width  # a·d: = h unless the head size is set apart
    if v.kv_materialised:
        add("repeat_kv", 2 * e * s * b * (q - kv))
    if recompute == "none" and v.softmax_fp32 and e < FP32_BYTES:
        # The fp32 softmax output replaces the paper's e one; without dropout the e copy is kept by the
        # matmul with V too (with dropout the copy feeds the dropout, which keeps only its mask).
        add("softmax_fp32", (FP32_BYTES - e) * scores + (0 if dropout else e * scores))
    if v.sdpa_kernel == "math":
        # Q·√scale, Kᵀ·√scale and V in fp32 (K, V repeated to a heads for GQA), then softmax, dropout mask
        # and dropout output as fp32 a·s² tensors; the paper's flash row counted e-byte Q, K, V and the LSE.
        acc = FP32_BYTES
        add("sdpa_math_fallback", 3 * acc * s * b * q - (e * s * b * q + 2 * e * s * b * kv) + 3 * acc * scores
            - act.LSE_BYTES * a * s * b)  # fmt: skip
    if v.sdpa_value_keeps_qkv:
        add("sdpa_value_keeps_qkv", e * s * b * (arch.q_width + arch.kv_width))  # Q's and K's share of it
    if v.sdpa_output_copy:
        add("sdpa_output_copy", e * sbh)
    add("sdpa_fake_mask", v.sdpa_mask_bytes * bss)
    add("rotary_tables", 2 * e * s * v.rotary_dims, shared)
    if v.routing_weight_bytes and arch.moe and recompute != "full":
        add("moe_fp32_routing_weights", (v.routing_weight_bytes - e) * arch.expert_rows(s * b))
    return LayerAccount(paper, dep, shared)


def implementation_account(arch: Architecture, seq: int, batch: int, **settings: str) -> LayerAccount:
    """`layer_account` of the variant `activation_variant(arch, **settings)` picks (impl, precision, attention,
    recompute, device; its defaults)."""
    return layer_account(arch, seq, batch, activation_variant(arch, **settings))


def implementation_layer_bytes(arch: Architecture, seq: int, batch: int, **settings: str) -> int:
    """Bytes one layer of `impl` stores on `device` for one micro-batch (without the once-per-forward terms).

    The implementation's counterpart of `formulas.activations.layer_bytes` (no tensor parallelism); `settings`
    are those of `activation_variant` (impl, precision, attention, recompute, device).
    """
    return implementation_account(arch, seq, batch, **settings).per_layer


@dataclass(frozen=True)
class OutsideAccount:
    """Bytes stored outside the transformer blocks (`measure`'s `activations_other`)."""

    embedding: int
    """Floating-point embedding activations: `formulas.activations.embedding_bytes` plus departures."""
    output: int
    """Final norm, head and loss: `formulas.activations.output_bytes` plus departures."""
    indices: int
    """int64 token ids, labels, position ids and the losses' 0-dim total weights (not in the paper)."""
    paper: int
    """`embedding_bytes(e, m=1) + output_bytes(e)`: the paper's count."""

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.indices


def outside_account(arch: Architecture, seq: int, batch: int, variant: ActivationVariant) -> OutsideAccount:
    """Embedding, output-layer and loss bytes of `variant` (Korthikanti's terms plus the departures)."""
    e, v = variant.elem_bytes, variant
    s, b, h = seq, batch, arch.hidden
    sbh, sb = s * b * h, s * b
    per_norm_stats = arch.norm_statistics * sb * v.stats_bytes
    paper_embedding = act.embedding_bytes(arch, s, b, elem_bytes=e, mask_bytes=1)
    paper_output = act.output_bytes(arch, s, b, elem_bytes=e)
    dropout = arch.dropout > 0
    # transformers Llama has no embedding dropout; the others drop the embedding sum with F.dropout.
    embedding_dropout = dropout and v.residual_dropouts > 0
    embedding = paper_embedding + ((v.mask_bytes if embedding_dropout else 0) - (1 if dropout else 0)) * sbh
    ids = INDEX_BYTES * sb * (1 + (1 if arch.type_vocab else 0))
    loss_weight = FP32_BYTES if v.loss_logit_bytes == act.LOSS_LOGIT_BYTES else e  # nll_loss's total_weight
    if arch.family == "decoder":
        norm_extra = (v.norm_element_bytes - e) * sbh + ((v.norm_output_bytes or e) * sbh if v.norm_saves_output else 0)
        norm_extra += FP32_BYTES * h if v.norm_weight_copy else 0
        output = paper_output + per_norm_stats + norm_extra
        indices = ids + INDEX_BYTES * sb + loss_weight + (INDEX_BYTES * s if v.position_ids_saved else 0)
    else:
        embedding += per_norm_stats  # the embedding LayerNorm
        output = paper_output
        indices = ids
        if arch.mlm_head:
            output += per_norm_stats + (v.loss_logit_bytes - act.LOSS_LOGIT_BYTES) * sb * arch.vocab
            indices += INDEX_BYTES * sb + loss_weight
        if arch.nsp_head:
            output += (v.loss_logit_bytes - act.LOSS_LOGIT_BYTES) * b * 2
            indices += INDEX_BYTES * b + loss_weight
    return OutsideAccount(embedding, output, indices, paper_embedding + paper_output)


@dataclass(frozen=True)
class OutsideBytes:
    """The once-per-forward bytes outside the blocks, as a record keeps them."""

    embedding: int
    output: int
    indices: int
    total: int


@dataclass(frozen=True)
class ImplementationSummary:
    """The variant's prediction for one run: what the record keeps as `predicted.implementation`."""

    model: str
    """`reference` or the transformers model type."""
    device: str
    """The device the account is for (where the run was measured)."""
    paper_per_layer: int
    per_layer: int
    layers: list[int]
    """Bytes per layer as `measure` attributes them (the first layer also keeps the per-forward tables)."""
    departures: dict[str, int]
    shared: dict[str, int]
    outside: OutsideBytes
    total: int
    unmeasured: list[str] = field(default_factory=list)
    """What the account assumes without a measurement behind it (CUDA kernels not measured here)."""


def implementation_summary(spec: RunSpec, device: str | None = None) -> ImplementationSummary | None:
    """The variant's prediction for a record: per-layer bytes, departures and the outside terms.

    `device` is where the run was measured (a record's `measured.device`; default the spec's device). None
    when the settings are not modelled: no architecture, inference, tensor or pipeline parallelism,
    an unresolved `auto` device, CUDA autocast, or transformers with selective recomputation.
    """
    arch, t = spec.model.arch, spec.training
    device = device or spec.measurement.device
    if (
        arch is None
        or spec.measurement.mode != "train"
        or spec.parallel.tp > 1
        or spec.parallel.pp > 1
        or device not in MEASURED_DEVICES
        or (t.finetune != "full" and spec.measurement.impl != "hf")  # LoRA runs on transformers' models only
    ):
        return None
    try:
        variant = activation_variant(
            arch, impl=spec.measurement.impl, precision=t.precision, attention=t.attention, recompute=t.recompute,
            device=device,
        )  # fmt: skip
    except ValueError:
        return None
    account = layer_account(arch, t.seq, t.batch, variant)
    outside = outside_account(arch, t.seq, t.batch, variant)
    layers = account.layers(arch.n_layers)
    notes = list(variant.unmeasured)
    if t.finetune != "full":  # LoRA's saved tensors, measured (formulas.finetune, tests/test_finetune.py)
        layers, other = lora_implementation(arch, variant.model, t, layers, cpu=device != "cuda")
        outside = replace(outside, output=outside.output + other)
        notes += first_block_note(arch, variant.model, t)
    return ImplementationSummary(
        model=variant.model,
        device=device,
        paper_per_layer=account.paper,
        per_layer=account.per_layer,
        layers=layers,
        departures=dict(account.departures),
        shared=dict(account.shared),
        outside=OutsideBytes(outside.embedding, outside.output, outside.indices, outside.total),
        total=sum(layers) + outside.total,
        unmeasured=notes,
    )
