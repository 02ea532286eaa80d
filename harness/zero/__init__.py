"""DeepSpeed ZeRO: the config built from a RunSpec, DeepSpeed's estimators, and an exact per-rank account.

ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054) shards model states over the N data-parallel ranks:
stage 1 the optimizer state, stage 2 also the gradients, stage 3 also the parameters. Transformer
Math 101 turns that into "divide by N"; DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`) assume 16-bit parameters and Adam whatever the run. What a rank
really holds is neither: flat buffers padded for alignment, the whole gradient of a parameter that
straddles a partition boundary, an fp32 master copy even for fp32 parameters, reduce buckets,
persistent (never partitioned) small parameters, parameters gathered for the module in use.

This package, by role:
- `config`: the DeepSpeed config from the spec, a user's JSON deep-merged over it, what DeepSpeed cannot run;
- `estimator`: DeepSpeed's own model-state estimators, the third column of the per-rank table;
- `account`: the types of a rank's account as a record keeps it (no torch, no DeepSpeed);
- `accounting`: every tensor DeepSpeed holds by term (weights, gradients, optimizer, extras) and by named
  component, found by walking the engine's attributes; the sum is checked against the live-storage total
  (`residual_bytes`), so nothing is left unaccounted.
The engine itself runs behind the trainer protocol in `harness.trainers.deepspeed`.

Where each component lives (deepspeed 0.19.8):
- ZeRO-1/2, `runtime/zero/stage_1_and_2.py`, `DeepSpeedZeroOptimizer`: parameters are views into
  `bit16_groups_flat` (one flat buffer per group, padded to a multiple of 2·N elements); the fp32
  master partition `single_partition_of_fp32_groups` is what the base optimizer steps; after backward
  `grads_in_partition` holds the reduced gradients of every parameter that overlaps the rank's partition
  (`copy_grads_in_partition`), viewed by `averaged_gradients` with zero `_zero_padding` tensors; during
  backward the IPG bucket (`setup_buckets`: `reduce_bucket_size` elements, two with `overlap_comm`)
  gathers gradients for `average_tensor`. ZeRO-1 keeps every full gradient until the end of backward
  (`reduce_gradients`), ZeRO-2 reduces bucket by bucket during backward.
- ZeRO-3, `runtime/zero/stage3.py`, `DeepSpeedZeroOptimizer_Stage3`, and
  `runtime/zero/partition_parameters.py`: each parameter keeps `ds_tensor`, its ceil(numel/N)-element
  partition in the defragmented `lp_param_buffer`; parameters below `stage3_param_persistence_threshold`
  elements stay whole on every rank (`persistent_parameters`); others are gathered per module
  (`PartitionedParameterCoordinator`, prefetching `stage3_prefetch_bucket_size` elements) and freed by
  assigning an empty `param.data` once `stage3_max_live_parameters` are live or the parameter is not
  reused within `stage3_max_reuse_distance` (both 1e9 by default: a small model stays gathered through
  the forward); `grad_partitions_flat_buffer` holds the gradient partitions;
  `fp32_partitioned_groups_flat` the master; the IPG bucket lives for the engine's life.
- ZeRO-0: the base optimizer, or for 16-bit parameters `runtime/fp16/unfused_optimizer.py`
  (`FP16_UnfusedOptimizer`: an fp32 copy per parameter in `fp32_groups`).
- bf16 with ZeRO-1 and fp32 gradient accumulation (a user's `data_types.grad_accum_dtype`):
  `runtime/bf16_optimizer.py` (`BF16_Optimizer`: a full-size fp32 gradient buffer
  `fp32_groups_gradients_flat`).
"""
