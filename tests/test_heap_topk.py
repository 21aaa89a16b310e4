import threading

import pytest
import torch
from conftest import random_clt, random_pixels

from clt_explorer.model import heap_topk
from clt_explorer.model.heap_topk import replays, top_indices
from clt_explorer.model.sparsifiers import abs_topk, relu_topk


@pytest.fixture
def launches(monkeypatch) -> list[tuple[int, int]]:
    """The (rows, parts) of every launch of the compiled selection."""
    seen, select = [], heap_topk._select_rows

    def counted(bits, shift, k, out, parts):
        seen.append((bits.shape[0], parts))
        return select(bits, shift, k, out, parts)

    monkeypatch.setattr(heap_topk, "_select_rows", counted)
    return seen


def tie_heavy(shape, dtype, seed=0) -> torch.Tensor:
    """Values on a coarse grid (quarters, most between -8 and 8), so that most rows tie at their k-th value, as a CLT's
    bfloat16 pre-activations do."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).mul(4).round().div(4).to(dtype)


def ties_at_kth(scores: torch.Tensor, k: int) -> float:
    kth = scores.float().topk(k, dim=-1).values[..., -1:]
    return float(((scores.float() == kth).sum(-1) > 1).float().mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_same_indices_in_the_same_order_as_torch_where_rows_tie(dtype, launches):
    scores = tie_heavy((300, 8192), dtype)
    assert ties_at_kth(scores, 128) > 0.9  # the case a threshold or a partition gets wrong
    expected = scores.topk(128, dim=-1, sorted=False).indices
    assert torch.equal(top_indices(scores, 128), expected)
    assert [rows for rows, _ in launches] == [300]


def test_extremes_negative_zeros_and_a_batch_axis(launches):
    scores = tie_heavy((2, 40, 8192), torch.bfloat16, seed=1)
    scores[0, :, :3000] = float("-inf")  # masked features (AuxK's allowed set)
    scores[1, :5, :] = 0.0
    scores[1, :5, ::3] = -0.0  # -0 and +0 tie, as torch's float comparison has them
    scores[1, 7, 100] = float("inf")
    for k in (1, 2, 127, 128):
        assert torch.equal(top_indices(scores, k), scores.topk(k, dim=-1, sorted=False).indices), k
    assert len(launches) == 4


def test_a_nan_leaves_the_selection_to_torch(launches):
    scores = tie_heavy((40, 8192), torch.bfloat16, seed=2)
    scores[17, 4000] = float("nan")  # torch ranks it above everything
    found = top_indices(scores, 128)
    assert torch.equal(found, scores.topk(128, dim=-1, sorted=False).indices)
    assert found[17, 0] == 4000 and len(launches) == 1


@pytest.mark.parametrize("shape, k, dtype", [((4, 1000), 16, torch.bfloat16),  # k x 64 > n: torch's nth_element
                                             ((4, 8192), 128, torch.float64), ((4, 8192), 0, torch.float32)])
def test_other_cases_keep_torch_topk(shape, k, dtype, launches):
    scores = tie_heavy(shape, dtype)
    assert not replays(scores, k)
    assert torch.equal(top_indices(scores, k), scores.topk(k, dim=-1, sorted=False).indices)
    assert launches == []


def test_a_torch_built_without_libstdcxx_keeps_its_own_topk(monkeypatch, launches):
    monkeypatch.setattr(heap_topk, "LIBSTDCXX", False)  # macOS's libc++ and Windows's STL order a heap otherwise
    scores = tie_heavy((40, 8192), torch.bfloat16, seed=4)
    assert not replays(scores, 128)
    assert torch.equal(top_indices(scores, 128), scores.topk(128, dim=-1, sorted=False).indices)
    assert launches == []


def test_the_sparsifiers_select_as_torch_did():
    pre = tie_heavy((50, 8192), torch.bfloat16, seed=3)
    for select, scores in ((relu_topk, pre), (abs_topk, pre.abs())):
        codes = select(pre, 128)
        expected = scores.topk(128, dim=-1, sorted=False).indices
        assert torch.equal(codes.indices, expected)
        assert torch.equal(codes.values, pre.gather(-1, expected).relu() if select is relu_topk
                           else pre.gather(-1, expected))


@pytest.mark.parametrize("tokens", ["all", "cls"])
def test_a_bfloat16_replaced_pass_is_torchs_bit_for_bit(random_teacher, monkeypatch, launches, tokens):
    clt = random_clt(random_teacher, 16, "relu_topk", 4, seed=5).to(torch.bfloat16)  # F = 16 d: 4 x 64 <= F
    pixels = random_pixels(random_teacher)

    def replaced_pass():
        surrogate = clt.surrogate(teacher_xs=random_teacher.capture(pixels).xs)
        with torch.no_grad(), random_teacher.replace_mlps(surrogate, 0, tokens):
            return random_teacher.encode_images(pixels), surrogate.codes + list(surrogate.teacher_codes.values())

    replayed, replayed_codes = replaced_pass()
    assert len(launches) == clt.config.n_layers  # the teacher's x_l and the pass's own in one selection a layer
    monkeypatch.setattr(heap_topk, "replays", lambda scores, k: False)
    expected, expected_codes = replaced_pass()
    assert torch.equal(replayed, expected)
    for found, codes in zip(replayed_codes, expected_codes, strict=True):
        assert torch.equal(found.indices, codes.indices) and torch.equal(found.values, codes.values)


def test_threads_selecting_at_once_get_their_own_rows():
    inputs = [tie_heavy((64, 8192), torch.bfloat16, seed=10 + i) for i in range(4)]
    found: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        for _ in range(5):
            found[i] = top_indices(inputs[i], 128)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, scores in enumerate(inputs):
        assert torch.equal(found[i], scores.topk(128, dim=-1, sorted=False).indices)
