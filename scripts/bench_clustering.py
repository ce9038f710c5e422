"""Benchmark: sdmerge's exact batched ATC against the authors' path (scipy, one sample at a time).

For every token count N, batch B, keep rate and linkage, both paths cluster the same random
metric ``[B, N, D]`` into ``k = N - floor(N * (1 - keep))`` clusters:

- sdmerge: ``sdmerge.cluster(metric, k, linkage)`` (distances, clustering, labels; on the metric's device);
- authors' path: distances by one matrix product ``1 - u u^T`` (float32), then per sample a
  float64 copy on the host, ``scipy.cluster.hierarchy.linkage`` + ``fcluster(maxclust)``.

Repetitions are interleaved (sdmerge, authors, sdmerge, ...) after one untimed warm-up of each;
the table reports median milliseconds per call, the speedup authors/sdmerge (> 1: sdmerge is
faster) as the median of the ratios within each repetition (robust to the machine's load
drifting between repetitions) with their range, and whether sdmerge's partition equals
scipy's on sdmerge's own float64 distance matrix (the exactness oracle) and the authors'
partition (computed from their own float32 product).

    python scripts/bench_clustering.py            # full grid (a few minutes on 2 CPU cores)
    python scripts/bench_clustering.py --quick    # a small grid, seconds
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

import sdmerge
from sdmerge.core import LINKAGES, cosine_distances, tokens_to_remove


def canonical(labels: np.ndarray) -> np.ndarray:
    first: dict = {}
    return np.array([first.setdefault(v, len(first)) for v in labels.tolist()])


def authors_path(metric: torch.Tensor, k: int, method: str) -> list[np.ndarray]:
    unit = F.normalize(metric.float(), dim=-1)
    distances = 1 - unit @ unit.transpose(1, 2)
    labels = []
    for sample in distances:  # one sample at a time, on the host, as the authors' code does
        d = sample.double().cpu().numpy()
        np.fill_diagonal(d, 0.0)
        labels.append(fcluster(linkage(squareform(d, checks=False), method), k, "maxclust"))
    return labels


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def run_case(tokens, batch, keep, method, dim, repeats, device):
    metric = torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(tokens * 7 + batch)).to(device)
    k = tokens - tokens_to_remove(tokens, keep)
    ours_fn = lambda: sdmerge.cluster(metric, k, method)  # noqa: E731
    authors_fn = lambda: authors_path(metric, k, method)  # noqa: E731
    ours_labels, authors_labels = ours_fn(), authors_fn()  # warm-up, and the partitions compared
    ours_times, authors_times = [], []
    for _ in range(repeats):
        ours_times.append(timed(ours_fn, device)[0])
        authors_times.append(timed(authors_fn, device)[0])
    reference = cosine_distances(metric).cpu().numpy()
    same_as_scipy = all(
        np.array_equal(canonical(ours.cpu().numpy()),
                       canonical(fcluster(linkage(squareform(d, checks=False), method), k, "maxclust")))
        for ours, d in zip(ours_labels, reference)
    )
    same_as_authors = all(
        np.array_equal(canonical(ours.cpu().numpy()), canonical(theirs))
        for ours, theirs in zip(ours_labels, authors_labels)
    )
    ours_ms, authors_ms = 1e3 * statistics.median(ours_times), 1e3 * statistics.median(authors_times)
    speedups = [theirs / ours for ours, theirs in zip(ours_times, authors_times)]
    return {
        "N": tokens, "B": batch, "keep": keep, "linkage": method, "k": k,
        "sdmerge_ms": round(ours_ms, 2), "authors_ms": round(authors_ms, 2),
        "speedup": round(statistics.median(speedups), 2),
        "speedup_min": round(min(speedups), 2), "speedup_max": round(max(speedups), 2),
        "same_as_scipy": same_as_scipy, "same_as_authors": same_as_authors,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N in {197, 1024}, B=2, one repeat")
    parser.add_argument("--tokens", type=int, nargs="+", default=[197, 1024, 4096])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.4])
    parser.add_argument("--linkages", nargs="+", default=list(LINKAGES), choices=LINKAGES)
    parser.add_argument("--dim", type=int, default=64, help="metric features D (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.batch, args.repeats = [197, 1024], [2], 1
    device = torch.device(args.device)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", metric float32 D={args.dim}, {args.repeats} interleaved repeats, median ms per call")
    rows = []
    header = "| N | B | keep | linkage | sdmerge ms | authors' path ms | speedup (range) | same as scipy | same as authors |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for tokens in args.tokens:
        for batch in args.batch:
            for keep in args.keep_rates:
                for method in args.linkages:
                    row = run_case(tokens, batch, keep, method, args.dim, args.repeats, device)
                    rows.append(row)
                    print(f"| {tokens} | {batch} | {keep} | {method} | {row['sdmerge_ms']:.1f} | "
                          f"{row['authors_ms']:.1f} | {row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) | "
                          f"{'yes' if row['same_as_scipy'] else 'NO'} | {'yes' if row['same_as_authors'] else 'no'} |",
                          flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0 if all(row["same_as_scipy"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
