"""Training throughput of one CLT, in tokens per second, against the device's measured matmul rate.

On a GPU: true ViT-B/32 scale (L = 12, d = 768, F = 12288, k = 128), bf16 autocast, dense decoding.
Without one: a reduced width (default d = 192, F = 3072) in fp32 on the CPU, sparse and dense decoding.

flops_per_token counts the matrix multiplications a dense implementation must do for one token,
forward and backward (3 x forward): encoders 2 L d F, decoders 2 (L(L+1)/2) F d per forward.
matmul_fraction = tokens_per_s x flops_per_token / (the rate of one large matmul measured in the same
run, in the training dtype: bf16 on a GPU, fp32 on a CPU).

    python scripts/bench_train.py [--d-model 768 --expansion 16 --k 128 --batch-tokens 4096 --steps 20]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.training.train import DeadFeatureTracker, TrainConfig, make_optimizer, training_step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of a size^3 matmul in ``dtype``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def flops_per_token(config: CLTConfig) -> int:
    L, d, n = config.n_layers, config.d_model, config.n_features
    forward = 2 * L * d * n + 2 * (L * (L + 1) // 2) * n * d
    return 3 * forward


def tokens_per_second(config: CLTConfig, device: torch.device, batch_tokens: int, steps: int, sparse: bool,
                      autocast: torch.dtype | None) -> float:
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(config, device=device)
    cfg = TrainConfig()
    optimizer = make_optimizer(clt, cfg)
    tracker = DeadFeatureTracker(config.n_layers, config.n_features, 10_000_000, device)
    xs = torch.randn(config.n_layers, batch_tokens, config.d_model, device=device)
    ys = torch.randn(config.n_layers, batch_tokens, config.d_model, device=device)
    for _ in range(2):  # warm-up
        training_step(clt, clt, optimizer, tracker, xs, ys, cfg, autocast, sparse)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        training_step(clt, clt, optimizer, tracker, xs, ys, cfg, autocast, sparse)
    synchronize(device)
    return batch_tokens * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768 if gpu else 192)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=4096 if gpu else 1024)
    parser.add_argument("--steps", type=int, default=20 if gpu else 5)
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    config = CLTConfig(args.layers, args.d_model, args.expansion, "relu_topk", args.k)
    dtype = torch.bfloat16 if gpu else torch.float32
    rate = matmul_rate(device, dtype, 8192 if gpu else 2048)
    flops = flops_per_token(config)
    paths = [("dense", False)] if gpu else [("sparse", True), ("dense", False)]
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; CLT L={config.n_layers} d={config.d_model} F={config.n_features} k={config.k} "
          f"({config.n_parameters / 1e6:.0f}M parameters), {args.batch_tokens} tokens per batch, "
          f"{'bf16 autocast' if gpu else 'fp32'}")
    print(f"measured {str(dtype).replace('torch.', '')} matmul rate: {rate / 1e12:.2f} TFLOP/s; "
          f"dense work per token (fwd + bwd): {flops / 1e9:.2f} GFLOP")
    print(f"{'decoding':10} {'tokens/s':>12} {'TFLOP/s':>9} {'of matmul rate':>15}")
    results = []
    for path, sparse in paths:
        autocast = torch.bfloat16 if gpu else None
        speed = tokens_per_second(config, device, args.batch_tokens, args.steps, sparse, autocast)
        results.append({"path": path, "tokens_per_s": speed, "matmul_fraction": speed * flops / rate})
        print(f"{path:10} {speed:12.0f} {speed * flops / 1e12:9.2f} {100 * speed * flops / rate:14.1f}%")
    best = max(results, key=lambda r: r["tokens_per_s"])
    print(json.dumps({"device": name, "tokens_per_s": best["tokens_per_s"], "flops_per_token": flops,
                      "matmul_fraction": best["matmul_fraction"], "path": best["path"],
                      "matmul_tflops": rate / 1e12, "d_model": config.d_model, "n_features": config.n_features,
                      "k": config.k, "batch_tokens": args.batch_tokens, "all": results}))


if __name__ == "__main__":
    main()
