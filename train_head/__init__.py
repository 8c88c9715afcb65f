"""Training and evaluation of the fusion head from a feature store (no backbone library is needed).

train.py       `maria train`: TrainConfig, run_train (AdamW, warmup + cosine, best-by-validation, exact resume)
evaluate.py    `maria eval`: EvalConfig, run_eval (trained / PoE / AR-only / MLM-only), compare_inits_plot
init.py        the `mix` init's fitted scales (the inits themselves live with the head: maria/head.py)
data.py        batches: in RAM (shuffled indices) or streamed (ShuffledReader + prefetch thread); decoding stored features
step.py        decoding a batch of stored features, one optimizer step (no store import: the device check runs it without zarr)
checkpoint.py  resumable checkpoints (safetensors + JSON, atomic), metrics.jsonl, loss.png
"""
