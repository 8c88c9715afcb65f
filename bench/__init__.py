"""`maria bench <what>`: benchmarks that measure (never tests). JSON out, a PNG beside it.

decode   bench/decode.py   infilling tokens/s against plain AR generation and MLM decoding (Figure 3)
extract  bench/extract.py  the extraction job against bare backbone forwards; store write speed
train    bench/train.py    head training rows/s against its read and head-step bounds
anneal   bench/anneal.py   generative perplexity against wall-clock time (Figure 5)
quality  bench/quality.py  MARIA's gain over the AR alone against MLM strength (pre-training runs and their snapshots)
serve    bench/serve.py    `maria serve` under load: throughput and latency, one client at a time against 16 concurrent
fp8      bench/fp8.py      float8 against float16 feature stores: eval NLL of a head trained on each, bytes, rates
shapes   bench/shapes.py   the whole pipeline at a preset's real shapes (`paper`: ModernBERT-large + OLMo-1B):
                           wall time, peak RSS against the weights' bytes, store bytes per token
checksum bench/checksum.py checking a checkpoint's sha256 digests at load, against reading its weights
The dispatcher is bench/run.py; shared set-up (config, presets, random backbones, timing): bench/setup.py.
Outside `maria bench`: `python -m maria_bench.layout` (store layouts) and `python -m maria_bench.device_check`
(the prepared GPU check, bench/device_check.sh). This file imports nothing, so the device check can import
`maria_bench.device_check` on an image without Ray or zarr.
"""
