"""Report a results directory: measured next to predicted, per term and per method, as Markdown and HTML.

    tmath report results/cpu-smoke                     # results/cpu-smoke/report/{report.md, report.html, *.png}
    tmath report results/a100-node --export parquet    # + report/runs.parquet, one flat row per run

Everything is computed from the records in runs.jsonl (the newest record of each spec key):
- an environment header (GPU, driver, CUDA, torch, transformers, deepspeed, git commit, harness
  version, hosts), read from the records, never from the machine that renders the report;
- measured vs predicted per term (weights, gradients, optimizer, activations, activations per
  layer, model states, peak allocated vs the predicted total; inference runs: peak vs the 1.2 rule),
  as a table and as log-log scatter plots with the y = x line;
- the error distribution (predicted / measured) by term and by method: Korthikanti et al. (the
  harness's formulas), the naive Q&A formula and its 4C-MLP correction, and DeepSpeed's estimator
  where a record carries it (ZeRO runs; it predicts model states only);
- activation bytes per layer against sequence length, with the formula curves;
- TFLOP/s and MFU per configuration against the bar (`harness.check`, scaled to each GPU);
- the failed runs (status, error) in their own table.
The HTML file is self-contained (plots embedded as base64 PNG); the PNGs also sit beside it.
"""
