"""Measure the extraction driver's peak memory and the job's throughput at a given corpus size
(not a test: run by hand, numbers go in the README's scale model).

    PYTHONPATH=. python tests/driver_memory.py 2000 [--hidden 32] [--files 8] [--chars 300]

Writes a parquet corpus of N documents (--chars characters each) over --files files and tiny random
backbones (in a child process, so this one never imports torch), extracts it on an embedded Ray,
and prints one JSON line: the driver's peak RSS, blocks, rows, tokens/s (steady state) and store
bytes per masked-token row.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("docs", type=int)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--docs-per-block", type=int, default=8)
    ap.add_argument("--chars", type=int, default=300)
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.prepare:
        return prepare(Path(args.prepare), args)
    work = Path(tempfile.mkdtemp(prefix="maria-rss-"))
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--prepare", str(work)], check=True)
    mlm, ar = json.loads((work / "models.json").read_text())
    corpus = work / "corpus"
    from maria_extract.job import ExtractConfig, run_extract

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    summary = run_extract(
        ExtractConfig(
            mlm=mlm,
            ar=ar,
            corpus=str(corpus),
            out=str(work / "store"),
            window_length=64,
            docs_per_block=args.docs_per_block,
            batch_size=32,
            ray_temp_dir=str(work / "ray"),
        )
    )  # short enough for Ray's sockets
    seconds = time.perf_counter() - t
    store_bytes = sum(p.stat().st_size for p in (work / "store" / "blocks").rglob("*") if p.is_file())
    steady = summary.get("steady_tokens", 0) / summary["steady_seconds"] if summary.get("steady_seconds") else None
    print(
        json.dumps(
            {
                "docs": args.docs,
                "hidden": args.hidden,
                "blocks": summary["blocks"],
                "rows": summary["rows"],
                "window_tokens": summary["new_tokens"],
                "seconds": round(seconds, 1),
                "steady_tok_s": steady and round(steady),
                "driver_rss_before_job_mb": round(rss_before),
                "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "store_bytes_per_row": round(store_bytes / max(1, summary["rows"]), 1),
                "work": str(work),
            }
        )
    )


def prepare(work: Path, args) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tiny import CORPUS, build_pair

    (work / "models.json").write_text(json.dumps(build_pair(work / "models", hidden=args.hidden)))
    corpus = work / "corpus"
    corpus.mkdir()
    per_file = -(-args.docs // args.files)
    for f in range(args.files):
        ids = range(f * per_file, min(args.docs, (f + 1) * per_file))
        texts = [" ".join(CORPUS[i % len(CORPUS) :] + CORPUS[: i % len(CORPUS)])[: args.chars] for i in ids]
        pq.write_table(pa.table({"text": texts}), corpus / f"part-{f:03d}.parquet")


if __name__ == "__main__":
    main()
