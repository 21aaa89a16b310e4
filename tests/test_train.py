import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_local_teacher
from safetensors.torch import load_file

from clt_explorer import CLTConfig, CrossLayerTranscoder
from clt_explorer.data.synthetic import SyntheticShapes
from clt_explorer.model.sparsifiers import SparseCodes
from clt_explorer.training.activations import ActivationStream, Position
from clt_explorer.training.checkpointing import load_checkpoint, save_checkpoint
from clt_explorer.training.train import (
    DeadFeatureTracker,
    TrainConfig,
    aux_k_loss,
    initialize_from_data,
    is_trained,
    make_optimizer,
    train_clt,
    training_step,
)

WORKER = Path(__file__).with_name("train_worker.py")


def run_worker(teacher_dir, out_dir, sparsifier="relu_topk", checkpoint_every=1000, kill_at=None, torchrun=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    env.pop("KILL_AT", None)
    if kill_at:
        env["KILL_AT"] = kill_at
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [
        sys.executable]
    return subprocess.run([*launcher, str(WORKER), str(teacher_dir), str(out_dir), sparsifier, str(checkpoint_every)],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker_teacher")
    make_local_teacher(folder, seed=4)
    return folder


def test_training_reduces_error_and_logs_per_layer_metrics(random_teacher, tmp_path):
    data = SyntheticShapes("train", n_images=64, seed=1)
    config = CLTConfig(random_teacher.n_layers, random_teacher.d_model, expansion=2, k=8)
    result = train_clt(random_teacher, data, config, TrainConfig(epochs=3, lr=2e-3, batch_tokens=256, chunk_images=32,
                                                                 warmup_steps=2, log_every=1), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, result.steps + 1))
    # per epoch: 2 chunks of 32 images x 17 tokens = 1088 tokens -> 4 full batches of 256 (64 tokens dropped)
    assert result.steps == 3 * 4
    assert result.tokens == 3 * 4 * 256
    for key in ("loss", "mse", "fvu", "l0", "dead_fraction"):
        assert key in records[0]
    assert len(records[0]["fvu"]) == random_teacher.n_layers
    first, last = records[0], records[-1]
    assert sum(last["fvu"]) < 0.8 * sum(first["fvu"])
    assert all(l0 == 8 for l0 in last["l0"])
    assert result.clt.config.teacher == random_teacher.identity
    assert is_trained(tmp_path) and not (tmp_path / "checkpoints").exists()
    again = train_clt(random_teacher, data, config, TrainConfig(epochs=3), tmp_path, progress=False)
    assert again.steps == result.steps and again.resumed_from == result.steps  # loaded, not retrained
    for name, tensor in result.clt.state_dict().items():
        assert torch.equal(tensor, again.clt.state_dict()[name])


def test_every_batch_is_full_and_an_epoch_is_every_token_once(random_teacher):
    """Tokens left over by a chunk start the next batch (no short batches with heavier weight); resuming at any
    batch gives exactly the batches of the uninterrupted stream from there."""
    data = SyntheticShapes("train", n_images=40, seed=3)
    stream = ActivationStream(random_teacher, data, batch_tokens=96, chunk_images=12, seed=1)  # 204 tokens a chunk
    batches = list(stream.iterate(Position(0, 0)))
    total = 40 * random_teacher.n_tokens
    assert len(batches) == stream.batches_per_epoch == total // 96
    assert all(b.xs.shape[1] == b.ys.shape[1] == 96 for b in batches)
    tokens = torch.cat([b.xs[0] for b in batches])
    assert torch.unique(tokens, dim=0).shape[0] == tokens.shape[0]  # no token twice
    pixels = random_teacher.preprocess_images([data[i][0] for i in range(40)])
    every = random_teacher.capture(pixels).xs[0].flatten(0, 1)
    distance = torch.cdist(tokens, every, compute_mode="donot_use_mm_for_euclid_dist")
    assert (distance.min(1).values < 1e-4).all()  # only the dataset's tokens
    assert [b.position for b in batches] == [Position(0, i) for i in range(len(batches))]
    for start in (3, 4, 7):  # a batch that straddles two chunks, one that does not, the last
        resumed = list(stream.iterate(Position(0, start)))
        assert len(resumed) == len(batches) - start
        assert all(torch.equal(a.xs, b.xs) and torch.equal(a.ys, b.ys) for a, b in zip(resumed, batches[start:]))
    with pytest.raises(ValueError, match="fewer than one batch"):
        ActivationStream(random_teacher, SyntheticShapes("train", n_images=2), batch_tokens=96, chunk_images=12)


def test_loader_workers_and_batches_that_do_not_fill_a_chunk_give_the_same_stream(random_teacher):
    """Every chunk's images come through one loader per pass, in batches that never hold two chunks' images: worker
    processes give the stream bit for bit, and batches of 5 images (a chunk holds 12) the same tokens as whole chunks
    in one batch, to float rounding."""
    data = SyntheticShapes("train", n_images=40, seed=3)

    def stream(**options):
        return list(ActivationStream(random_teacher, data, batch_tokens=96, chunk_images=12, seed=1,
                                     **options).iterate(Position(0, 2)))
    serial, workers, whole = stream(image_batch_size=5), stream(image_batch_size=5, num_workers=2), stream()
    assert len(serial) == len(workers) == len(whole) > 3
    assert all(torch.equal(a.xs, b.xs) and torch.equal(a.ys, b.ys) for a, b in zip(serial, workers))
    assert all(torch.allclose(a.xs, b.xs, atol=1e-5) and torch.allclose(a.ys, b.ys, atol=1e-5)
               for a, b in zip(serial, whole))


def test_num_workers_overrides_the_devices_loader_workers():
    assert TrainConfig(num_workers=3).loader_workers(torch.device("cuda"), 10**12) == 3
    assert TrainConfig(num_workers=3).loader_workers(torch.device("cpu"), 1) == 3
    assert TrainConfig().loader_workers(torch.device("cpu"), 1) == 0


@pytest.mark.parametrize("sparsifier, sparse_decoder, gathers", [
    ("relu_topk", None, True), ("relu_topk", True, True), ("relu_topk", False, False), ("abs_topk", True, True),
    ("jumprelu", True, True), ("jumprelu", None, True), ("jumprelu", False, False)])
def test_a_training_step_decodes_as_its_config_says(sparsifier, sparse_decoder, gathers, monkeypatch):
    """``sparse_decoder`` chooses the gather (on a CPU: embedding_bag) or the matmul, and by default a CPU gathers,
    for every sparsifier (JumpReLU's gather reads the inactive codes its straight-through gradient reaches too)."""
    calls, embedding_bag = [], torch.nn.functional.embedding_bag
    monkeypatch.setattr(torch.nn.functional, "embedding_bag",
                        lambda *args, **kwargs: calls.append(1) or embedding_bag(*args, **kwargs))
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(3, 8, 4, sparsifier, 4))
    cfg = TrainConfig(sparse_decoder=sparse_decoder, aux_coef=0.0)
    before = clt.W_dec[0].detach().clone()
    training_step(clt, clt, make_optimizer(clt, cfg), DeadFeatureTracker(3, 32, 10**6, torch.device("cpu")),
                  torch.randn(3, 16, 8), torch.randn(3, 16, 8), cfg, None)
    assert bool(calls) == gathers and not torch.equal(clt.W_dec[0], before)


def _train_steps(clt, optimizer, cfg, batches):
    tracker = DeadFeatureTracker(clt.config.n_layers, clt.config.n_features, 10**6, torch.device("cpu"))
    for xs, ys in batches:
        training_step(clt, clt, optimizer, tracker, xs, ys, cfg, None)


def _with_kernels(optimizer, fused, foreach):
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = fused, foreach
    return optimizer


def _batches(n, generator_seed=1):
    generator = torch.Generator().manual_seed(generator_seed)
    return [(torch.randn(3, 16, 8, generator=generator), torch.randn(3, 16, 8, generator=generator)) for _ in range(n)]


def test_the_fused_optimizer_moves_every_parameter_as_torchs_reference_adamw():
    """make_optimizer's AdamW steps in torch's fused kernel, and moves every parameter (JumpReLU's thresholds in their
    own group, at their own rate, without weight decay) as torch's single-tensor AdamW does."""
    torch.manual_seed(0)
    config, cfg = CLTConfig(3, 8, 4, "jumprelu", 4), TrainConfig(aux_coef=0.0, weight_decay=0.01, warmup_steps=1)
    fused, reference = CrossLayerTranscoder(config), CrossLayerTranscoder(config)
    reference.load_state_dict(fused.state_dict())
    thresholds = fused.sparsifier.log_threshold.detach().clone()
    optimizer = make_optimizer(fused, cfg)
    assert [group["fused"] for group in optimizer.param_groups] == [True, True]
    _train_steps(fused, optimizer, cfg, _batches(3))
    _train_steps(reference, _with_kernels(make_optimizer(reference, cfg), None, False), cfg, _batches(3))
    for (name, moved), expected in zip(fused.named_parameters(), reference.parameters()):
        assert torch.allclose(moved, expected, rtol=1e-5, atol=1e-7), name
    assert not torch.equal(fused.sparsifier.log_threshold, thresholds)


def test_a_checkpoint_resumes_under_the_resuming_optimizers_kernels(tmp_path):
    """A checkpoint written by a foreach AdamW (an older version's) resumes its moments and step count under the
    fused kernel of the resuming run, whose next step is the one the foreach optimizer would have taken."""
    torch.manual_seed(0)
    config, cfg = CLTConfig(3, 8, 4, "abs_topk", 4), TrainConfig(aux_coef=0.0)
    clt = CrossLayerTranscoder(config)
    old = _with_kernels(make_optimizer(clt, cfg), None, True)
    first, last = _batches(2), _batches(1, generator_seed=2)
    _train_steps(clt, old, cfg, first)
    save_checkpoint(tmp_path, clt, old, {"since_fired": torch.zeros(3, 32)}, {"step": 2})
    resumed = CrossLayerTranscoder(config)
    optimizer = make_optimizer(resumed, cfg)
    load_checkpoint(tmp_path, resumed, optimizer, torch.device("cpu"))
    assert [(group["fused"], group["foreach"]) for group in optimizer.param_groups] == [(True, None)]
    assert all(float(state["step"]) == 2 for state in optimizer.state.values())
    _train_steps(clt, old, cfg, last)
    _train_steps(resumed, optimizer, cfg, last)
    for (name, expected), got in zip(clt.named_parameters(), resumed.parameters()):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), name


def test_initialization_from_data_sets_scales_bias_and_thresholds():
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(3, 16, 8, "jumprelu", 10))
    xs, ys = 3.0 * torch.randn(3, 4000, 16), torch.randn(3, 4000, 16) + 2.0
    initialize_from_data(clt, xs, ys)
    scaled = xs * clt.input_scale[:, None, None]
    assert torch.allclose(scaled.pow(2).sum(-1).mean(-1), torch.full((3,), 16.0), rtol=1e-4)
    assert torch.allclose(clt.b_dec, ys.mean(1))
    l0 = torch.stack([c.l0().float().mean() for c in clt.encode_sparse(xs)])
    assert ((l0 - 10).abs() < 1.5).all(), l0


def test_dead_features_are_tracked_and_aux_k_trains_only_them():
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(2, 8, 4, "relu_topk", 4))
    tracker = DeadFeatureTracker(2, 32, dead_after_tokens=100, device=torch.device("cpu"))
    codes = [SparseCodes(torch.ones(50, 1), torch.zeros(50, 1, dtype=torch.long), n_features=32) for _ in range(2)]
    tracker.update(codes, 50)
    tracker.update(codes, 50)
    assert tracker.dead[:, 0].sum() == 0 and tracker.dead[:, 1:].all()  # only feature 0 fired
    xs, ys = torch.randn(2, 50, 8), torch.randn(2, 50, 8)
    out = clt(xs)
    dead = torch.zeros(2, 32, dtype=torch.bool)
    dead[:, 10:20] = True
    loss = aux_k_loss(clt, out, ys, dead, aux_k=3)
    # reference: top-3 dead pre-activations (relu) of each layer decode the detached residual, no bias
    expected = 0.0
    for layer in range(2):
        pre = out.pre[layer].detach()
        masked = pre.masked_fill(~dead[layer], float("-inf"))
        idx = masked.topk(3, -1).indices
        z = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu())
        residual = ys[layer] - out.yhat[layer].detach()
        expected += (z @ clt.W_dec[layer][:, 0, :].detach() - residual).pow(2).mean()
    assert torch.isclose(loss, expected, rtol=1e-5)
    loss.backward()
    touched = clt.W_enc.grad.abs().sum(1) != 0  # [L, F]
    assert touched[:, 10:20].any() and not touched[:, :10].any() and not touched[:, 20:].any()
    assert clt.b_dec.grad is None or clt.b_dec.grad.abs().sum() == 0  # the residual is detached


def test_aux_k_takes_at_most_the_dead_features_of_each_layer():
    """A layer without dead features adds nothing; one with fewer than aux_k uses them all, and no live feature."""
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTConfig(2, 8, 4, "abs_topk", 4))
    xs, ys = torch.randn(2, 50, 8), torch.randn(2, 50, 8)
    out = clt(xs)
    dead = torch.zeros(2, 32, dtype=torch.bool)
    dead[1, [5, 17]] = True
    loss = aux_k_loss(clt, out, ys, dead, aux_k=3)
    pre = out.pre[1].detach()
    z = torch.zeros_like(pre)
    z[:, [5, 17]] = pre[:, [5, 17]]  # Abs-TopK keeps both dead codes with their sign
    residual = ys[1] - out.yhat[1].detach()
    assert torch.isclose(loss, (z @ clt.W_dec[1][:, 0, :].detach() - residual).pow(2).mean(), rtol=1e-5)
    assert torch.equal(aux_k_loss(clt, out, ys, torch.zeros_like(dead), aux_k=3), torch.zeros(()))


def test_negative_codes_count_as_firing_in_dead_feature_tracking():
    """Abs-TopK codes can be negative: a feature fires when its code is != 0, not > 0."""
    tracker = DeadFeatureTracker(1, 8, dead_after_tokens=10, device=torch.device("cpu"))
    negative = SparseCodes(torch.full((20, 1), -1.5), torch.full((20, 1), 3), n_features=8)
    tracker.update([negative], 20)
    assert not tracker.dead[0, 3] and tracker.dead[0, [0, 1, 2, 4, 5, 6, 7]].all()


def test_ddp_two_processes_end_with_identical_weights(teacher_dir, tmp_path):
    done = run_worker(teacher_dir, tmp_path, "jumprelu", torchrun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert json.loads((tmp_path / "training.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["step:2", "step:7", "checkpoint:1", "checkpoint:2", "final:1"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(teacher_dir, tmp_path, kill_at):
    reference = run_worker(teacher_dir, tmp_path / "reference", "abs_topk", checkpoint_every=3)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = run_worker(teacher_dir, tmp_path / "run", "abs_topk", checkpoint_every=3, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL
    assert not is_trained(tmp_path / "run")
    resumed = run_worker(teacher_dir, tmp_path / "run", "abs_topk", checkpoint_every=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(tmp_path / "reference" / "rank0.safetensors")
    got = load_file(tmp_path / "run" / "rank0.safetensors")
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, steps[-1] + 1)), "the log has every step exactly once"
