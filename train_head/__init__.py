"""Training and evaluation of the fusion head from a feature store (no backbone is loaded).

train.py     `maria train`: TrainConfig, run_train (AdamW, warmup + cosine, best-by-validation, exact resume)
evaluate.py  `maria eval`: EvalConfig, run_eval (trained / PoE / AR-only / MLM-only), compare_inits_plot
init.py      initial heads: poe, ar-only, random, mix (per-expert scales fitted on the training rows)
data.py      batches: in RAM (shuffled indices) or streamed (ShuffledReader + prefetch thread)
checkpoint.py  head folder, checkpoints (safetensors + JSON, atomic), metrics.jsonl, loss.png
bench.py     `maria bench train`: end-to-end rows/s against the read and head-step bounds
"""
