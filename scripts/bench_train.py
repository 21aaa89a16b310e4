"""Training throughput of one CLT, in tokens per second, against the device's measured matmul rate.

On a GPU: true ViT-B/32 scale (L = 12, d = 768, F = 12288, k = 128), bf16 autocast. Without one: a reduced width
(default d = 192, F = 3072) in fp32 on the CPU. Both time each of the paper's sparsifiers (ReLU-TopK, Abs-TopK,
JumpReLU; started from the batch as training starts, JumpReLU's thresholds near the (1 - k/F) quantile) with the dense
decoder and the sparse one (a gather of the active rows: embedding_bag on a CPU, the Triton kernels of
clt_explorer/model/triton_gather.py on a GPU), whose outputs and gradients are first compared with the dense decoder's
for 256 tokens in fp32 on the same device ("vs dense", the largest relative difference). JumpReLU's gather also reads
the inactive codes its straight-through gradient reaches (those within half its bandwidth below their threshold).

flops_per_token counts the matrix multiplications a dense implementation must do for one token,
forward and backward (3 x forward): encoders 2 L d F, decoders 2 (L(L+1)/2) F d per forward.
matmul_fraction = tokens_per_s x flops_per_token / (the rate of one large matmul measured in the same
run, in the training dtype: bf16 on a GPU, fp32 on a CPU).

``--profile`` then runs a few more steps of each decoding path under the torch profiler and prints where their time
goes: the ops with the most self time (device time on a GPU) and the shares of matmuls, top-k selection, gathers and
scatters, zeroing, the optimizer and the rest (in the JSON line too). A JSON line is printed after each path, the
figures so far, so that a run stopped at a time limit keeps the paths it finished; the last line is the whole run
(with ``--profile``, printed once more after the profiles' tables).

    python scripts/bench_train.py [--d-model 768 --expansion 16 --k 128 --batch-tokens 4096 --steps 20]
                                  [--sparsifiers relu_topk,abs_topk,jumprelu] [--decoders dense,sparse] [--profile]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.model.sparsifiers import SPARSIFIERS
from clt_explorer.training.train import (
    DeadFeatureTracker,
    TrainConfig,
    initialize_from_data,
    make_optimizer,
    training_step,
)


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


# op name -> group, by the first pattern the name contains; ops run inside the optimizer's step count as "optimizer"
OP_GROUPS = (("matmul", ("mm", "matmul", "linear")), ("top-k", ("topk", "sort")),
             ("gather and scatter", ("embedding", "gather", "scatter", "index")), ("zeroing", ("fill_", "zero_")))
AGREEMENT_TOKENS = 256  # tokens of the float32 check of the sparse path against the dense one
OPTIMIZER = "Optimizer.step"  # the torch optimizers' own profiler label


def op_group(event) -> str:
    """The group of a profiled op: "optimizer" inside the optimizer's step, else by :data:`OP_GROUPS`, else
    "elementwise and other"."""
    parent = event
    while parent is not None:
        if parent.name.startswith(OPTIMIZER):
            return "optimizer"
        parent = parent.cpu_parent
    lowered = event.name.lower()
    return next((group for group, patterns in OP_GROUPS if any(p in lowered for p in patterns)),
                "elementwise and other")


class Trainer:
    """One CLT, its optimizer and a random token batch: :meth:`step` is one training step."""

    def __init__(self, config: CLTConfig, device: torch.device, batch_tokens: int, sparse: bool,
                 autocast: torch.dtype | None):
        torch.manual_seed(0)
        self.clt, self.cfg = CrossLayerTranscoder(config, device=device), TrainConfig(sparse_decoder=sparse)
        self.autocast = autocast
        self.optimizer = make_optimizer(self.clt, self.cfg)
        self.tracker = DeadFeatureTracker(config.n_layers, config.n_features, 10_000_000, device)
        self.xs = torch.randn(config.n_layers, batch_tokens, config.d_model, device=device)
        self.ys = torch.randn(config.n_layers, batch_tokens, config.d_model, device=device)
        initialize_from_data(self.clt, self.xs, self.ys)

    def step(self) -> None:
        training_step(self.clt, self.clt, self.optimizer, self.tracker, self.xs, self.ys, self.cfg, self.autocast)


def difference_from_dense(trainer: Trainer) -> float:
    """The largest relative difference ||sparse - dense|| / ||dense|| between the two decoding paths' outputs and
    parameter gradients for the first ``AGREEMENT_TOKENS`` tokens of the trainer's batch, in float32: the gather
    checked on the device that times it."""
    clt, xs, ys = trainer.clt, trainer.xs[:, :AGREEMENT_TOKENS], trainer.ys[:, :AGREEMENT_TOKENS]
    found = {}
    for sparse in (False, True):
        clt.zero_grad(set_to_none=True)
        out = clt(xs, sparse=sparse)
        (out.yhat - ys).pow(2).mean().backward()
        found[sparse] = {"yhat": out.yhat.detach(),
                         **{name: p.grad for name, p in clt.named_parameters() if p.grad is not None}}
    clt.zero_grad(set_to_none=True)
    if found[True].keys() != found[False].keys():
        return float("inf")
    return max(float((found[True][name] - dense).norm() / dense.norm().clamp_min(1e-30))
               for name, dense in found[False].items())


def tokens_per_second(trainer: Trainer, steps: int) -> float:
    device = trainer.xs.device
    for _ in range(2):  # warm-up
        trainer.step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    synchronize(device)
    return trainer.xs.shape[1] * steps / (time.perf_counter() - start)


def profile(trainer: Trainer, steps: int, rows: int = 12) -> dict:
    """Run ``steps`` training steps under the torch profiler: the ops with the most self time (on a GPU, the device
    time of the kernels each op launched itself) as a table, and each op group's share of the total."""
    device = trainer.xs.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step()
        synchronize(device)
    by_op: dict[str, list] = {}  # name -> [self time in us, calls]
    groups: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU or event.name.startswith(OPTIMIZER):
            continue  # kernels count through the ops that launched them; the optimizer's label through its ops
        spent = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        entry = by_op.setdefault(event.name, [0.0, 0])
        entry[0] += spent
        entry[1] += 1
        group = op_group(event)
        groups[group] = groups.get(group, 0.0) + spent
    total = sum(groups.values()) or 1.0
    ranked = sorted(by_op.items(), key=lambda item: -item[1][0])[:rows]
    return {"time_per_step_ms": total / 1e3 / steps,
            "groups": {group: spent / total for group, spent in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": name, "share": spent / total, "calls": calls // steps}
                        for name, (spent, calls) in ranked]}


def print_profile(result: dict) -> None:
    found = result["profile"]
    print(f"\nprofile of the {result['sparsifier']} {result['path']} path: {found['time_per_step_ms']:.1f} ms of op "
          "self time per step")
    print("  " + ", ".join(f"{group} {100 * share:.0f}%" for group, share in found["groups"].items()))
    print(f"  {'op':40} {'share':>6} {'calls/step':>11}")
    for op in found["top_ops"]:
        print(f"  {op['op'][:40]:40} {100 * op['share']:5.1f}% {op['calls']:11d}")


def listed(parser: argparse.ArgumentParser, option: str, value: str, known) -> list[str]:
    """A comma-separated option's names, each one of ``known`` (else the parser's error)."""
    names = value.split(",")
    if not value or set(names) - set(known):
        parser.error(f"--{option} takes {', '.join(known)}, got {value!r}")
    return names


def summary(name: str, config: CLTConfig, batch_tokens: int, flops: int, rate: float, results: list[dict]) -> dict:
    """The JSON line: the fastest path overall, the fastest per sparsifier (``best``), and every path (``all``)."""
    measured = [r for r in results if "error" not in r]
    best: dict[str, dict] = {}  # in the order the sparsifiers were timed
    for result in measured:
        if result["tokens_per_s"] > best.get(result["sparsifier"], {}).get("tokens_per_s", 0):
            best[result["sparsifier"]] = {key: result[key] for key in ("path", "tokens_per_s", "matmul_fraction")}
    fastest = max(measured, key=lambda r: r["tokens_per_s"]) if measured else {}
    return {"device": name, "tokens_per_s": fastest.get("tokens_per_s"), "flops_per_token": flops,
            "matmul_fraction": fastest.get("matmul_fraction"), "path": fastest.get("path"),
            "sparsifier": fastest.get("sparsifier"), "best": best, "matmul_tflops": rate / 1e12,
            "d_model": config.d_model, "n_features": config.n_features, "k": config.k, "batch_tokens": batch_tokens,
            "all": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768 if gpu else 192)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--batch-tokens", type=int, default=4096 if gpu else 1024)
    parser.add_argument("--steps", type=int, default=20 if gpu else 5)
    parser.add_argument("--sparsifiers", default=",".join(SPARSIFIERS),
                        help="sparsifiers to time, comma-separated (default: every registered one, the paper's three)")
    parser.add_argument("--decoders", default="dense,sparse",
                        help="decoding paths to time, comma-separated: sparse (a gather of the active rows), dense")
    parser.add_argument("--profile", action="store_true", help="then profile a few steps of each path")
    parser.add_argument("--profile-steps", type=int, default=3)
    args = parser.parse_args()
    sparsifiers = listed(parser, "sparsifiers", args.sparsifiers, SPARSIFIERS)
    decoders = listed(parser, "decoders", args.decoders, ("sparse", "dense"))
    device = torch.device("cuda" if gpu else "cpu")
    configs = {s: CLTConfig(args.layers, args.d_model, args.expansion, s, args.k) for s in sparsifiers}
    config = configs[sparsifiers[0]]
    dtype = torch.bfloat16 if gpu else torch.float32
    rate = matmul_rate(device, dtype, 8192 if gpu else 2048)
    flops = flops_per_token(config)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; CLT L={config.n_layers} d={config.d_model} F={config.n_features} k={config.k} "
          f"({config.n_parameters / 1e6:.0f}M parameters), {args.batch_tokens} tokens per batch, "
          f"{'bf16 autocast' if gpu else 'fp32'}")
    print(f"measured {str(dtype).replace('torch.', '')} matmul rate: {rate / 1e12:.2f} TFLOP/s; "
          f"dense work per token (fwd + bwd): {flops / 1e9:.2f} GFLOP")
    print(f"{'sparsifier':10} {'decoding':10} {'tokens/s':>12} {'TFLOP/s':>9} {'of matmul rate':>15} {'vs dense':>14}")
    results = []
    for sparsifier in sparsifiers:
        for path in decoders:
            results.append(measure_path(configs[sparsifier], device, args, path, flops, rate))
            print(json.dumps(summary(name, config, args.batch_tokens, flops, rate, results)), flush=True)
    if args.profile:  # the profiles' tables follow the figures, which then come once more as the last line
        for result in results:
            if "profile" in result:
                print_profile(result)
        print(json.dumps(summary(name, config, args.batch_tokens, flops, rate, results)))
    return 0 if all("error" not in r for r in results) else 1


def measure_path(config: CLTConfig, device: torch.device, args: argparse.Namespace, path: str, flops: int,
                 rate: float) -> dict:
    """One sparsifier's decoding path: its tokens/s (and profile), printed as a row; a path that fails (out of memory,
    an op this device lacks, a kernel that does not compile) is recorded with its error, so that the other paths'
    figures still come out."""
    gpu = device.type == "cuda"
    row = f"{config.sparsifier:10} {path:10}"
    try:  # one trainer at a time: at true size each holds ~14 GB of weights and optimizer state
        trainer = Trainer(config, device, args.batch_tokens, path == "sparse", torch.bfloat16 if gpu else None)
        speed = tokens_per_second(trainer, args.steps)
        difference = difference_from_dense(trainer) if trainer.cfg.sparse_decoder else 0.0
        result = {"sparsifier": config.sparsifier, "path": path, "tokens_per_s": speed,
                  "matmul_fraction": speed * flops / rate, "difference_from_dense": difference}
        print(f"{row} {speed:12.0f} {speed * flops / 1e12:9.2f} {100 * speed * flops / rate:14.1f}% "
              f"{difference:14.1e}", flush=True)
        if args.profile:
            result["profile"] = profile(trainer, args.profile_steps)
        return result
    except Exception as error:  # torch.OutOfMemoryError, NotImplementedError, a Triton kernel's TritonError among them
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{row} failed: {message}", flush=True)
        return {"sparsifier": config.sparsifier, "path": path, "error": message}
    finally:
        trainer = None  # frees the weights and optimizer state before the next path's trainer
        if gpu:
            torch.cuda.empty_cache()

if __name__ == "__main__":
    sys.exit(main())
