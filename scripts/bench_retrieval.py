"""Retrieval at true size on synthetic codes: build time, bytes, query time and recall@10 of the
compact index against the exact FAISS index, for the CLS and the patch-mean descriptors of one layer
(the app holds 2 x L such indexes per CLT; multiply the per-index figures accordingly).

Synthetic codes (defaults: 50k images, F = 12288, k = 128, 49 patch tokens + CLS, as ViT-B/32):
features have a heavy-tailed global popularity (Zipf, exponent 0.8); each of 100 classes draws a
pool of 2048 features; each image mixes 800 of its class's features with 224 popular ones; each
token keeps k of the image's features (Gumbel top-k with Zipfian in-image weights), values
Exp(1) x a per-image feature strength. Patch-mean descriptors are then ~1000-sparse with a heavy
tail, as real ones are; re-measure recall on real codes (tests/test_retrieval.py does on tiny CLIP).

    python scripts/bench_retrieval.py [--images 50000] [--features 12288] [--k 128] [--patches 49]
        [--queries 200] [--keep-patches 256] [--query-keep 256]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from clt_explorer.retrieval.index import ExactIndex, SparseIndex, truncate


def synthetic_descriptors(n_images: int, n_features: int, k: int, n_patches: int, seed: int,
                          batch: int = 500) -> dict[str, np.ndarray]:
    """Normalised dense CLS and patch-mean descriptors [n_images, F] of synthetic codes."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_features + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    class_pools = np.stack([rng.choice(n_features, 2048, replace=False, p=popularity) for _ in range(100)])
    out = {"cls": np.zeros((n_images, n_features), np.float32), "patches": np.zeros((n_images, n_features), np.float32)}
    in_image_weight = np.log(1.0 / np.arange(1, 1025) ** 0.7)
    for start in range(0, n_images, batch):
        b = min(batch, n_images - start)
        classes = rng.integers(0, 100, b)
        own = np.stack([rng.choice(class_pools[c], 800, replace=False) for c in classes])
        popular = rng.choice(n_features, (b, 224), p=popularity)
        pool = np.concatenate([own, popular], 1)  # [b, 1024]
        strength = rng.gamma(2.0, 0.5, size=pool.shape).astype(np.float32)
        tokens = 1 + n_patches
        keys = rng.gumbel(size=(b, tokens, pool.shape[1])).astype(np.float32) + in_image_weight[rng.permutation(1024)]
        chosen = np.argpartition(-keys, k - 1, axis=2)[:, :, :k]  # [b, tokens, k] positions in the pool
        features = np.take_along_axis(np.broadcast_to(pool[:, None], (b, tokens, pool.shape[1])), chosen, 2)
        values = np.take_along_axis(np.broadcast_to(strength[:, None], (b, tokens, pool.shape[1])), chosen, 2)
        values = values * rng.exponential(1.0, size=values.shape).astype(np.float32)
        f, v = torch.from_numpy(np.ascontiguousarray(features)), torch.from_numpy(np.ascontiguousarray(values))
        for name, sl in (("cls", slice(0, 1)), ("patches", slice(1, None))):
            dense = torch.zeros(b, n_features)
            dense.scatter_add_(1, f[:, sl].flatten(1), v[:, sl].flatten(1))
            out[name][start:start + b] = torch.nn.functional.normalize(dense, dim=-1).numpy()
    return out


def recall_at(reference: np.ndarray, found: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(r[:k]) & set(f[:k])) / k for r, f in zip(reference, found)]))


def timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    index.search(queries[:2], k)  # warm up
    start = time.perf_counter()
    ids = np.concatenate([index.search(q[None], k)[1] for q in queries])
    return ids, 1000 * (time.perf_counter() - start) / len(queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--features", type=int, default=12288)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--patches", type=int, default=49)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--keep-patches", type=int, default=448)
    parser.add_argument("--query-keep", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)

    start = time.perf_counter()
    database = synthetic_descriptors(args.images, args.features, args.k, args.patches, args.seed)
    queries = synthetic_descriptors(args.queries, args.features, args.k, args.patches, args.seed + 1)
    print(f"generated {args.images} + {args.queries} synthetic images in {time.perf_counter() - start:.1f} s")

    rows, summary = [], {}
    for tokens, keep in (("cls", args.k), ("patches", args.keep_patches)):
        start = time.perf_counter()
        exact = ExactIndex.build(database[tokens])
        exact_build = time.perf_counter() - start
        reference, exact_ms = timed_search(exact, queries[tokens], 10)
        exact_bytes = exact.nbytes
        del exact
        start = time.perf_counter()
        idx, val = truncate(database[tokens], keep)
        compact = SparseIndex.build(idx, val, args.features, args.query_keep)
        compact_build = time.perf_counter() - start
        found, compact_ms = timed_search(compact, queries[tokens], 10)
        recall = recall_at(reference, found, 10)
        rows.append((tokens, "exact", exact_build, exact_bytes, exact_ms, 1.0))
        rows.append((tokens, f"compact keep={keep} query_keep={args.query_keep}", compact_build, compact.nbytes,
                     compact_ms, recall))
        summary[tokens] = {"recall_at_10": recall, "index_bytes": compact.nbytes, "exact_index_bytes": exact_bytes,
                           "query_ms_per_layer": compact_ms, "exact_query_ms_per_layer": exact_ms,
                           "build_s": compact_build, "exact_build_s": exact_build}

    print(f"\n{args.images} images, F = {args.features}, k = {args.k}, {args.patches} patch tokens, "
          f"{args.queries} queries, 2 CPU threads; one index = one layer and token set")
    print(f"{'tokens':8} {'mode':36} {'build s':>8} {'MB':>9} {'ms/query':>9} {'recall@10':>9} {'% of exact':>10}")
    for tokens, mode, build, nbytes, ms, recall in rows:
        share = 100 * nbytes / summary[tokens]["exact_index_bytes"]
        print(f"{tokens:8} {mode:36} {build:8.2f} {nbytes / 1e6:9.1f} {ms:9.2f} {recall:9.3f} {share:9.1f}%")
    worst = {"recall_at_10": min(s["recall_at_10"] for s in summary.values()),
             "index_bytes": max(s["index_bytes"] for s in summary.values()),
             "exact_index_bytes": summary["cls"]["exact_index_bytes"],
             "query_ms_per_layer": max(s["query_ms_per_layer"] for s in summary.values()),
             "exact_query_ms_per_layer": max(s["exact_query_ms_per_layer"] for s in summary.values()),
             "build_s": max(s["build_s"] for s in summary.values()),
             "images": args.images, "features": args.features, "per_token_set": summary}
    print(json.dumps(worst))


if __name__ == "__main__":
    main()
