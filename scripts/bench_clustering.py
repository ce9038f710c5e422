"""Benchmark: sdmerge's exact batched ATC against the authors' path (scipy, one sample at a time).

For every token count N, batch B, keep rate and linkage, each path clusters the same random
metric ``[B, N, D]`` into ``k = N - floor(N * (1 - keep))`` clusters:

- sdmerge: ``sdmerge.cluster(metric, k, linkage, path=...)`` for each ``--path`` (default both,
  ``cpu`` and ``accelerator``; distances, clustering, labels; on the metric's device);
- authors' path: distances by one matrix product ``1 - u u^T`` (float32), then per sample a
  float64 copy on the host, ``scipy.cluster.hierarchy.linkage`` + ``fcluster(maxclust)``.

Repetitions are interleaved (each sdmerge path, authors, each sdmerge path, ...) after one
untimed warm-up of each; the table has one row per sdmerge path: median milliseconds per call,
the speedup authors/sdmerge (> 1: sdmerge is faster) as the median of the ratios within each
repetition (robust to the machine's load drifting between repetitions) with their range, the
merge rounds, and the aten operations and host synchronisations per call and per round
(``eval/dispatch_counts.py``: one extra call under torch.profiler; "per round" counts the
events inside the rounds, the distances and the cut being once per call), and whether the
partition equals scipy's on sdmerge's own float64 distance matrix (the exactness oracle) and
the authors' partition (computed from their own float32 product).

    python scripts/bench_clustering.py            # full grid (a few minutes on 2 CPU cores)
    python scripts/bench_clustering.py --quick    # a small grid, seconds
    python scripts/bench_clustering.py --tokens 4096 --batch 2 --keep-rates 0.4 --dim 320 --threads 2
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for eval/

from eval.dispatch_counts import count_dispatches  # noqa: E402
from eval.optional import optional_import, require  # noqa: E402
from sdmerge.core import LINKAGES, cosine_distances, tokens_to_remove  # noqa: E402
from sdmerge.core.agglomerative import cluster_with_rounds  # noqa: E402
from sdmerge.core.rnn_rounds import ROUND_RANGE  # noqa: E402

PATHS = ("cpu", "accelerator")
hierarchy = optional_import("scipy.cluster.hierarchy")  # the authors' path and the exactness oracle
distance = optional_import("scipy.spatial.distance")


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
        labels.append(scipy_partition(d, k, method))
    return labels


def scipy_partition(distances: np.ndarray, k: int, method: str) -> np.ndarray:
    """scipy's ``k``-cluster cut of ``method`` linkage on a square float64 distance matrix."""
    return hierarchy.fcluster(hierarchy.linkage(distance.squareform(distances, checks=False), method), k, "maxclust")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def run_case(tokens, batch, keep, method, dim, repeats, device, paths):
    """One row per sdmerge path (see the module docstring)."""
    metric = torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(tokens * 7 + batch)).to(device)
    k = tokens - tokens_to_remove(tokens, keep)
    ours = {path: (lambda path=path: cluster_with_rounds(metric, k, method, path=path)) for path in paths}
    authors_fn = lambda: authors_path(metric, k, method)  # noqa: E731
    results = {path: fn() for path, fn in ours.items()}  # warm-up, and the partitions compared
    authors_labels = authors_fn()
    times = {path: [] for path in paths}
    authors_times = []
    for _ in range(repeats):
        for path, fn in ours.items():
            times[path].append(timed(fn, device)[0])
        authors_times.append(timed(authors_fn, device)[0])
    reference = [canonical(scipy_partition(d, k, method)) for d in cosine_distances(metric).cpu().numpy()]
    rows = []
    for path in paths:
        labels, rounds = results[path]
        counts = count_dispatches(ours[path], within=ROUND_RANGE)
        ops_per_round, syncs_per_round = counts.per_range()
        speedups = [theirs / mine for mine, theirs in zip(times[path], authors_times)]
        rows.append({
            "N": tokens, "B": batch, "keep": keep, "linkage": method, "k": k, "path": path,
            "sdmerge_ms": round(1e3 * statistics.median(times[path]), 2),
            "authors_ms": round(1e3 * statistics.median(authors_times), 2),
            "speedup": round(statistics.median(speedups), 2),
            "speedup_min": round(min(speedups), 2), "speedup_max": round(max(speedups), 2),
            "rounds": rounds, "aten_ops": counts.aten_ops, "host_syncs": counts.host_syncs,
            "aten_ops_per_round": round(ops_per_round, 1), "host_syncs_per_round": round(syncs_per_round, 2),
            "same_as_scipy": all(np.array_equal(canonical(got.cpu().numpy()), want)
                                 for got, want in zip(labels, reference)),
            "same_as_authors": all(np.array_equal(canonical(got.cpu().numpy()), canonical(theirs))
                                   for got, theirs in zip(labels, authors_labels)),
        })
    return rows


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
    parser.add_argument("--path", nargs="+", default=list(PATHS), choices=PATHS,
                        help="sdmerge clustering paths to run, side by side (default: both)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    args = parser.parse_args(argv)
    require(hierarchy, distance)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.batch, args.repeats = [197, 1024], [2], 1
    device = torch.device(args.device)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", metric float32 D={args.dim}, {args.repeats} interleaved repeats, median ms per call")
    rows = []
    header = ("| N | B | keep | linkage | path | sdmerge ms | authors' path ms | speedup (range) | rounds | "
              "aten ops / call | syncs / call | aten ops / round | syncs / round | same as scipy | same as authors |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for tokens in args.tokens:
        for batch in args.batch:
            for keep in args.keep_rates:
                for method in args.linkages:
                    for row in run_case(tokens, batch, keep, method, args.dim, args.repeats, device, args.path):
                        rows.append(row)
                        speedup = f"{row['speedup']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})"
                        print(f"| {tokens} | {batch} | {keep} | {method} | {row['path']} | {row['sdmerge_ms']:.1f} | "
                              f"{row['authors_ms']:.1f} | {speedup} | "
                              f"{row['rounds']} | {row['aten_ops']} | {row['host_syncs']} | {row['aten_ops_per_round']:.1f} | "
                              f"{row['host_syncs_per_round']:.2f} | {'yes' if row['same_as_scipy'] else 'NO'} | "
                              f"{'yes' if row['same_as_authors'] else 'no'} |", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0 if all(row["same_as_scipy"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
