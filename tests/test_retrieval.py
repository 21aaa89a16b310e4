import numpy as np
import pytest
import scipy.sparse
import threadpoolctl
import torch

from clt_explorer.data import load_dataset
from clt_explorer.model.sparsifiers import SparseCodes
from clt_explorer.retrieval.build import COMPACT_DEFAULTS, build_retrieval, compact_builder, index_settings
from clt_explorer.retrieval.compact import (
    FINE_ARRAYS,
    CompactBuilder,
    CompactIndex,
    coarse_entries,
    fine_bytes,
    spread_rows,
)
from clt_explorer.retrieval.fine_codec import COMMON_SHARE, fit_fine_codec
from clt_explorer.retrieval.fine_rows import FineRows, decode_fine_rows, encode_fine_rows, fine_scores
from clt_explorer.retrieval.index import DESCRIPTOR_TOKENS, ExactIndex, RetrievalIndex, descriptors
from clt_explorer.retrieval.quality import recall_against_exact, same_class_rates
from clt_explorer.retrieval.thumbnails import ThumbnailStore, build_thumbnails
from clt_explorer.storage import AssetError


def random_descriptors(n, f=300, nnz=40, seed=0, signed=False):
    rng = np.random.default_rng(seed)
    out = np.zeros((n, f), np.float32)
    for row in out:
        idx = rng.choice(f, nnz, replace=False)
        row[idx] = rng.normal(size=nnz) if signed else rng.exponential(size=nnz)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_descriptors_are_normalised_cls_code_and_patch_mean():
    z = torch.zeros(2, 5, 30)
    z[0, 0, 3], z[0, 1, 4], z[0, 2, 4], z[0, 3, 7] = 2.0, 1.0, 3.0, -4.0
    codes = SparseCodes.from_dense(z)
    d = descriptors([codes])
    assert torch.allclose(d["cls"][0][0], torch.nn.functional.one_hot(torch.tensor(3), 30).float())
    patch_mean = z[0, 1:].mean(0)
    assert torch.allclose(d["patches"][0][0], patch_mean / patch_mean.norm())
    assert torch.equal(d["cls"][0][1], torch.zeros(30))  # an all-zero code stays zero


def compact(database, width=None, tmp=None, sample=None, coarse_keep=64, query_keep=512, candidates=300,
            head_share=0.1, directions=32):
    """A compact index of ``database`` (every entry kept unless ``width`` fine bytes per image are fewer; learning
    from ``sample`` when given)."""
    import tempfile
    from pathlib import Path

    width = width or 3 * (database.shape[1] + 2)
    builder = CompactBuilder(*database.shape, width, Path(tmp or tempfile.mkdtemp()), "t", sample, coarse_keep,
                             query_keep, candidates, head_share, directions)
    for start in range(0, len(database), 64):
        builder.add(database[start:start + 64])
    return builder.finish()


@pytest.mark.parametrize("signed", [False, True])
def test_compact_with_every_entry_is_exact_search_within_float16(signed):
    database, queries = random_descriptors(400, signed=signed), random_descriptors(20, seed=1, signed=signed)
    e_scores, e_ids = ExactIndex.build(database).search(queries, 10)
    c_scores, c_ids = compact(database, coarse_keep=40, query_keep=40, candidates=100).search(queries, 10)
    assert np.allclose(c_scores, e_scores, atol=2e-3)  # float16 values
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(e_ids, c_ids)]) >= 0.99


def largest_level(bits, signed):
    """The code of ``bits`` bits for a row's scale: 15 or 7 (4 or 3 bits), 7 or 3 with a sign bit."""
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


def decode_fine_row(data, head_count, scale, signed, n_features, common=(), tail_bits=4):
    """The dense vector a fine row stands for, read byte by byte as the format says (a reference for the vectorised
    decoder): the common block (a 4-bit code per common feature, low nibble first), 3-byte head slots (gap,
    little-endian float16), then 1-byte tail slots (gap << tail_bits | code)."""
    def value(code, bits):
        sign = 2 ** (bits - 1)
        if signed and code > sign:
            return -(code - sign) / largest_level(bits, signed) * scale
        return code / largest_level(bits, signed) * scale

    dense = np.zeros(n_features)
    for i, feature in enumerate(common):
        dense[feature] += value(int(data[i // 2]) >> (4 * (i % 2)) & 15, 4)
    data, feature = data[(len(common) + 1) // 2:], 0
    for slot in range(head_count):
        gap, low, high = data[3 * slot:3 * slot + 3]
        feature += int(gap)
        dense[feature] += np.frombuffer(bytes([low, high]), "<f2")[0]
    feature = 0
    for byte in data[3 * head_count:]:
        feature += int(byte) >> tail_bits
        dense[feature] += value(int(byte) % 2 ** tail_bits, tail_bits)
    return dense


def decode_rows(rows, n_features, common=()):
    return np.stack([decode_fine_row(rows.data[r], int(rows.head_count[r]), float(rows.tail_scale[r]),
                                     bool(rows.tail_signed[r]), n_features, common, int(rows.tail_bits[r]))
                     for r in range(len(rows.data))])


@pytest.mark.parametrize("signed", [False, True])
def test_fine_rows_keep_the_largest_entries_the_head_in_float16_and_the_tail_at_3_or_4_bits(signed):
    rng = np.random.default_rng(0)
    n_features = 2000
    vectors = np.zeros((7, n_features), np.float32)
    for row in vectors:
        ids = rng.choice(n_features, 300, replace=False)
        row[ids] = rng.normal(size=300) if signed else rng.exponential(size=300)
    vectors[0] = 0  # an empty row
    vectors[1] = 0
    vectors[1, [3, 700, 1999]] = [1.0, -2.0 if signed else 2.0, 0.5]  # long gaps take extra head slots
    vectors[2, :] = 0
    vectors[2, ::40] = np.linspace(1, 0.01, 50)  # gaps of 40 take extra tail slots once the head is full
    query = rng.normal(size=n_features).astype(np.float32)
    tail_bits = set()
    for width, head_keep in ((3 * 2010, 8), (400, 8), (400, 64), (100, 8), (12, 8)):
        rows = encode_fine_rows(vectors, width, head_keep)
        assert rows.data.shape == (7, width)
        decoded = decode_rows(rows, n_features)
        assert np.allclose(decode_fine_rows(rows, n_features), decoded, atol=1e-7)
        assert np.allclose(fine_scores(rows, query), decoded @ query, rtol=1e-5, atol=1e-6)
        for r in range(7):
            kept = np.flatnonzero(decoded[r])
            order = np.argsort(-np.abs(vectors[r]), kind="stable")
            assert set(kept) <= set(order[:len(kept) + 1]), (width, r)  # the strongest (a tail entry may code to 0)
            head = [f for f in order[:len(kept)] if abs(decoded[r, f] - vectors[r, f]) <= 1e-3 * abs(vectors[r, f])]
            n_head = int((vectors[r] != 0).sum()) if width == 3 * 2010 else min(head_keep, len(kept))
            assert len(head) >= n_head, (width, r)  # float16: the whole row when it fits, else at least head_keep
            step = 0.5 / largest_level(int(rows.tail_bits[r]), signed) + 1e-6  # the tail: within half a code
            tail = np.setdiff1d(kept, head)
            assert np.all(np.abs(decoded[r, tail] - vectors[r, tail]) <= step * rows.tail_scale[r]), (width, r)
            assert np.all(np.sign(decoded[r, tail]) == np.sign(vectors[r, tail]))
        tail_bits |= set(rows.tail_bits.tolist())
    assert tail_bits == {3, 4}
    empty = encode_fine_rows(vectors[:1], 100, 8)  # rows without a single head slot
    assert fine_scores(empty, query).tolist() == [0.0] and not decode_fine_rows(empty, n_features).any()
    rows = encode_fine_rows(vectors[:2], 12, 8)  # 4 head slots: the two strongest of row 1 fit, with 2 extra slots
    assert rows.head_count.tolist() == [0, 4]
    decoded = decode_rows(rows, n_features)[1]
    assert dict(zip(*np.nonzero(decoded), decoded[decoded != 0])) == {3: 1.0, 700: vectors[1, 700]}


def test_fine_scores_read_ids_past_the_features_as_the_decoder_does_and_refuse_features_outside():
    """Gaps that run past the last feature count as the last feature, as the decoder reads them; common features
    beyond the row or the query, or tail codes of unknown bits, fail."""
    vectors = random_descriptors(20, f=500, nnz=150, signed=True)
    common = np.arange(0, 500, 7)
    rows = encode_fine_rows(vectors, 160, 8, common)
    query = np.random.default_rng(5).normal(size=500).astype(np.float32)
    rows.data[5, -40:] = 0xFF  # long gaps and the largest codes: ids past 499
    assert np.allclose(fine_scores(rows, query, common), decode_fine_rows(rows, 500, common) @ query, atol=1e-5)
    wide_tail = FineRows(rows.data, rows.head_count, rows.tail_scale, rows.tail_signed, np.full(20, 5, np.uint8))
    for bad in ({"query": query[:300]}, {"common": np.arange(400)}, {"rows": wide_tail}):
        arguments = {"rows": rows, "query": query, "common": common, **bad}
        with pytest.raises(ValueError, match="do not match"):
            fine_scores(**arguments)


def test_a_row_that_leaves_entries_out_takes_3_bit_codes_where_they_lose_less():
    """Row 0's entries lie 20 features apart: a 4-bit gap needs an extra slot for each, a 5-bit gap none, so its 60
    tail bytes keep 55 entries with 3-bit codes against 25 with 4-bit ones, and lose less. Row 1's entries are
    adjacent: either code keeps 60 tail entries, and 4 bits round finer."""
    n_features = 2000
    vectors = np.zeros((2, n_features), np.float32)
    vectors[0, ::20] = np.linspace(1, 0.5, 100)
    vectors[1, :100] = np.linspace(1, 0.5, 100)
    rows = encode_fine_rows(vectors, 3 * 8 + 60, 8)  # 8 head slots, 60 tail slots
    assert rows.head_count.tolist() == [8, 8] and rows.tail_bits.tolist() == [3, 4]
    decoded = decode_rows(rows, n_features)
    # tail of row 0: the gap of 160 from 0 to its first entry takes 5 extra slots, then one slot per entry
    assert (decoded != 0).sum(1).tolist() == [8 + 55, 8 + 60]
    assert np.flatnonzero(decoded[0]).tolist() == list(range(0, 20 * 63, 20))
    assert np.abs(decoded[0] - vectors[0])[:20 * 63].max() <= 0.5 / 7 + 1e-6  # within half a 3-bit step of 1
    query = np.random.default_rng(0).normal(size=n_features).astype(np.float32)
    assert np.allclose(fine_scores(rows, query), decoded @ query, atol=1e-5)


def test_fine_rows_spend_spare_bytes_on_float16_and_score_closer_than_float16_alone():
    """With bytes for every entry at 4 bits but not in float16, the head grows into what the tail leaves; and at the
    same bytes a short float16 head with a 4-bit tail ranks like the exact cosine more often than float16 alone."""
    database, queries = random_descriptors(400, f=1000, nnz=200), random_descriptors(40, f=1000, nnz=200, seed=1)
    rows = encode_fine_rows(database, 500, 16)
    tail_slots = [len(row) - 3 * h - np.argmax(row[::-1] != 0) for row, h in zip(rows.data, rows.head_count)]
    assert (rows.head_count > 16).all() and (3 * rows.head_count + tail_slots <= 500).all()
    exact = np.argsort(-(queries @ database.T), axis=1)[:, :10]

    def recall(head_keep):
        rows = encode_fine_rows(database, 200, head_keep)
        found = np.argsort(-np.stack([fine_scores(rows, q) for q in queries]), axis=1)[:, :10]
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)])

    assert recall(16) > recall(10**6) + 0.1  # head_keep 10**6: every byte in float16 head slots


@pytest.mark.parametrize("signed", [False, True])
def test_common_features_take_a_4_bit_code_in_every_row_and_free_the_tail(signed):
    """Common features are coded at a fixed place (within half a step, signs kept) unless in the float16 head; the
    tail keeps the strongest of the other entries; scores of one query and of a query matrix match the reference."""
    rng = np.random.default_rng(3)
    n_features, common = 1000, np.arange(0, 1000, 5)  # every row has all 200 common features and 100 others
    vectors = np.zeros((6, n_features), np.float32)
    for row in vectors:
        ids = np.concatenate([common, rng.choice(np.setdiff1d(np.arange(n_features), common), 100, replace=False)])
        row[ids] = rng.normal(size=300) if signed else rng.exponential(size=300)
    query = rng.normal(size=n_features).astype(np.float32)
    rows = encode_fine_rows(vectors, 200, 8, common)
    decoded = decode_rows(rows, n_features, common)
    assert np.allclose(decode_fine_rows(rows, n_features, common), decoded, atol=1e-7)
    assert np.allclose(fine_scores(rows, query, common), decoded @ query, rtol=1e-5, atol=1e-5)
    step = 0.5 / (7 if signed else 15) + 1e-6
    for r in range(6):
        head = np.flatnonzero(np.abs(decoded[r] - vectors[r]) <= 1e-3 * np.abs(vectors[r]))
        assert len(head) >= 8 and set(np.argsort(-np.abs(vectors[r]))[:8]) <= set(head)
        coded = np.setdiff1d(common, head)
        assert np.all(np.abs(decoded[r, coded] - vectors[r, coded]) <= step * rows.tail_scale[r])
        assert np.all(decoded[r, coded] * vectors[r, coded] >= 0)
        rare = np.setdiff1d(np.flatnonzero(vectors[r]), np.concatenate([common, head]))
        kept = rare[decoded[r, rare] != 0]
        strongest = rare[np.argsort(-np.abs(vectors[r, rare]), kind="stable")]
        assert set(kept) <= set(strongest[:len(kept) + 1]) and len(kept) >= 10
    kept_without = (decode_rows(encode_fine_rows(vectors, 200, 8), n_features) != 0).sum(1)
    assert ((decoded != 0).sum(1) > kept_without + 10).all()  # 100 bytes of codes stand for 200 entries


def test_coarse_scores_are_the_sparse_matrix_product_through_the_query_columns():
    """The compiled column sums equal scipy's product of the coarse tier's chosen columns with their weights."""
    database = random_descriptors(700, f=1500, nnz=600)
    index = compact(database, 600, sample=database[spread_rows(700, 200)], coarse_keep=40, query_keep=1500,
                    candidates=400)
    rng = np.random.default_rng(3)
    columns = np.unique(rng.integers(0, 1500, 900))
    weights = rng.standard_normal(len(columns)).astype(np.float32)
    a = index.arrays
    coarse = scipy.sparse.csc_matrix((a["coarse_data"], a["coarse_indices"], a["coarse_indptr"]), shape=index.shape)
    expected = (coarse[:, columns] @ weights) * a["coarse_scale"]
    found = index._coarse_scores(columns, weights)
    assert found.dtype == np.float32 and found.shape == (700,) and np.abs(found).max() > 0
    assert np.allclose(found, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_the_codec_learns_nothing_from_whole_rows_else_common_features_and_directions():
    rng = np.random.default_rng(4)
    sample = np.zeros((300, 400), np.float32)
    sample[:, :10] = rng.exponential(size=(300, 10)) + 1  # in every row
    sample[:180, 10:20] = 1.0  # in 60% of the rows: a tight row would drop them where weak
    for row in sample:
        row[rng.choice(np.arange(20, 400), 30, replace=False)] = rng.exponential(size=30)
    whole = fit_fine_codec(sample, 3 * 60, 8)
    assert len(whole.common) == 0 and whole.directions.shape == (400, 0)
    codec = fit_fine_codec(sample, 60, 8)
    assert COMMON_SHARE == 2 / 3 and codec.common.tolist() == list(range(10))
    assert np.allclose(codec.directions.T @ codec.directions, np.eye(8), atol=1e-5)
    mean = sample.mean(0) / np.linalg.norm(sample.mean(0))
    assert abs(mean @ codec.directions[:, 0]) > 0.9  # uncentred: the first direction follows the mean
    assert len(fit_fine_codec(sample, 4, 8).common) == 4  # the block takes at most half of a 4-byte row


def test_the_correction_stores_the_rows_loss_along_its_directions_and_queries_add_it_back():
    """c = U^T (x - x') per image (x' its fine row, read by the reference decoder), and a score is q . x' + (U^T q) . c:
    exact for queries in span U, the loss outside it otherwise."""
    from clt_explorer.retrieval.fine_rows import FineRows

    database, queries = random_descriptors(500, f=400, nnz=120), random_descriptors(20, f=400, nnz=120, seed=1)
    database[:, :40] += 0.15  # a part every image shares, as real patch means do
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    index = compact(database, 300, sample=database[spread_rows(500, 200)], directions=8, coarse_keep=40,
                    query_keep=100, candidates=500)
    arrays = index.arrays
    directions, common = arrays["directions"], arrays["common_features"]
    assert directions.shape == (400, 8) and common.tolist() == list(range(40))
    decoded = decode_rows(FineRows(*(arrays[name] for name in FINE_ARRAYS)), 400, common)
    assert np.allclose(arrays["correction"], (database - decoded) @ directions, atol=2e-3)  # float16
    along = (directions @ np.random.default_rng(5).normal(size=(8, 5))).T.astype(np.float32)
    for query in (*queries, *along):
        scores, ids = index.search(query[None], 10)
        expected = decoded @ query + arrays["correction"].astype(np.float32) @ (directions.T @ query)
        assert np.allclose(scores[0], expected[ids[0]], atol=1e-5)
    scores, ids = index.search(along, 10)
    assert np.allclose(scores, np.take_along_axis(along @ database.T, ids, 1), atol=2e-3)
    without = compact(database, 300, sample=database[spread_rows(500, 200)], directions=0)
    assert without.arrays["fine_rows"].shape[1] > arrays["fine_rows"].shape[1]  # the same bytes, all in rows


def test_images_that_share_their_largest_entries_are_told_apart_by_their_projection():
    """When every image has the same strongest features (real patch means do), their largest entries cannot pick
    candidates; the projection on the sample's directions and the largest entries of what lies outside them can."""
    def shared_descriptors(n, seed):
        x = random_descriptors(n, f=1000, nnz=150, seed=seed)
        x[:, :20] += 0.3 * np.random.default_rng(7).uniform(0.8, 1.2, 20)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    database, queries = shared_descriptors(2000, 0), shared_descriptors(30, 1)
    exact = np.argsort(-(queries @ database.T), axis=1)[:, :10]
    settings = {"coarse_keep": 16, "query_keep": 100, "candidates": 50}

    def recall(directions):
        index = compact(database, 400, sample=database[spread_rows(2000, 500)], directions=directions, **settings)
        assert np.allclose(index.arrays["projection"], database @ index.arrays["directions"], atol=1e-6)
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, index.search(queries, 10)[1])])

    with_projection, without = recall(12), recall(0)
    print("recall with / without the projection and correction", with_projection, without)
    assert with_projection > without + 0.4


def test_a_saved_index_keeps_its_codec_and_refuses_directions_of_another_shape_or_unknown_codes(tmp_path):
    from clt_explorer.retrieval.compact import CompactIndex

    database, queries = random_descriptors(300, f=400, nnz=120), random_descriptors(5, f=400, nnz=120, seed=1)
    index = compact(database, 200, sample=database[spread_rows(300, 150)], directions=4)
    assert index.arrays["directions"].shape == (400, 4)
    index.save(tmp_path / "i")
    loaded = CompactIndex.load(tmp_path / "i")
    assert all(np.array_equal(loaded.arrays[name], index.arrays[name]) for name in CompactIndex.ARRAYS)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.search(queries, 5), index.search(queries, 5)))
    np.save(tmp_path / "i" / "directions.npy", np.zeros((400, 3), np.float32))
    with pytest.raises(AssetError, match="correction directions or common features do not match 400 features"):
        CompactIndex.load(tmp_path / "i")
    index.save(tmp_path / "i")
    tail_bits = index.arrays["tail_bits"].copy()
    tail_bits[7] = 5
    np.save(tmp_path / "i" / "tail_bits.npy", tail_bits)
    with pytest.raises(AssetError, match=r"tail codes of \[5\] bits; this version reads \(4, 3\)"):
        CompactIndex.load(tmp_path / "i")
    index.save(tmp_path / "i")
    head_count = index.arrays["head_count"].copy()
    head_count[2] = index.arrays["fine_rows"].shape[1]  # more slots than the row's bytes hold
    np.save(tmp_path / "i" / "head_count.npy", head_count)
    with pytest.raises(AssetError, match="head slots past the fine rows"):
        CompactIndex.load(tmp_path / "i")


def test_spread_rows_cover_the_corpus_evenly():
    assert spread_rows(10, 3).tolist() == [0, 4, 9] and spread_rows(3, 10).tolist() == [0, 1, 2]
    assert len(spread_rows(50_000, 1024)) == 1024


def test_fine_bytes_follow_the_budget_and_keep_small_corpora_whole():
    assert fine_bytes(10_000, 512, 0.05, 32 * 2**20, 64) == 3 * (512 + 3)  # a small corpus keeps every entry
    assert fine_bytes(50_000, 12288, 0.05, 32 * 2**20, 64) == int(0.05 * 12288 * 4 - 64 * 5 - 14)  # 14: per-row numbers


def test_the_coarse_tier_takes_at_most_its_share_of_the_bytes(tmp_path):
    assert coarse_entries(50_000, 12288, 0.1, 32 * 2**20, 256, 1 / 8) == int(0.1 * 12288 * 4 / 8 / 5)  # 122, not 256
    assert coarse_entries(50_000, 12288, 0.1, 32 * 2**20, 64, 1 / 8) == 64
    assert coarse_entries(1_000, 64, 1.0, 32 * 2**20, 256, 1 / 8) == 64  # never more than the features
    database = random_descriptors(200, f=256, nnz=60)
    settings = {**COMPACT_DEFAULTS, "budget": 0.2, "min_bytes": 0, "coarse_share": 1 / 8}  # 204.8 bytes per image
    builder = compact_builder(200, 256, settings, tmp_path, "share")
    builder.add(database)
    index = builder.finish()
    assert set(np.bincount(index.arrays["coarse_indices"], minlength=200)) == {5}  # 204.8 / 8 / 5 bytes per entry
    assert index.arrays["fine_rows"].shape[1] <= int(204.8 - 5 * 5 - 13)


def test_every_indexed_vector_finds_itself_first():
    database = random_descriptors(300)
    for index in (ExactIndex.build(database), compact(database, width=60, coarse_keep=8, query_keep=64)):
        _, ids = index.search(database, 3)
        assert (ids[:, 0] == np.arange(300)).all()


@pytest.mark.parametrize("mode", ["exact", "compact"])
def test_save_load_round_trip_returns_identical_results(tmp_path, mode):
    database, queries = random_descriptors(100), torch.from_numpy(random_descriptors(5, seed=2))
    make = (lambda d: ExactIndex.build(d)) if mode == "exact" else (
        lambda d: compact(d, width=90, coarse_keep=10, query_keep=30, candidates=20))
    index = RetrievalIndex({tokens: [make(database), make(database[::-1].copy())] for tokens in DESCRIPTOR_TOKENS},
                           mode, {"budget": 0.1})
    index.save(tmp_path)
    loaded = RetrievalIndex.load(tmp_path, n_layers=2, n_features=300, n_images=100)
    queries = {tokens: [queries, queries] for tokens in DESCRIPTOR_TOKENS}
    assert loaded.search(queries, 7) == index.search(queries, 7)
    assert loaded.settings == {"budget": 0.1} and loaded.nbytes == index.nbytes
    with pytest.raises(AssetError, match="n_features is 300, expected 512"):
        RetrievalIndex.load(tmp_path, n_features=512)


def test_searches_run_side_by_side_give_each_token_set_and_layer_its_own_index_results():
    """The (token set, layer) searches run on several threads: each result is its own index's, for the layers asked."""
    rng = np.random.default_rng(5)
    per_layer = {tokens: [compact(random_descriptors(120, seed=int(rng.integers(1000))), width=90, coarse_keep=10,
                                  query_keep=30, candidates=20) for _ in range(4)] for tokens in DESCRIPTOR_TOKENS}
    index = RetrievalIndex(per_layer, "compact")
    queries = {tokens: [torch.from_numpy(random_descriptors(2, seed=10 + layer)) for layer in range(4)]
               for tokens in DESCRIPTOR_TOKENS}
    found = index.search(queries, 4, layers=[3, 0, 2])
    for tokens in DESCRIPTOR_TOKENS:
        assert sorted(found[tokens]) == [0, 2, 3]
        for layer, hits in found[tokens].items():
            scores, ids = per_layer[tokens][layer].search(queries[tokens][layer].numpy(), 4)
            assert [[h.image_id for h in row] for row in hits] == ids.tolist()
            assert np.allclose([[h.score for h in row] for row in hits], scores)


def test_searches_run_numpys_blas_on_one_thread_and_give_it_back(monkeypatch):
    """Woken BLAS threads spin after each call and took the second core from torch's threads: a search keeps numpy's
    BLAS on one thread while it runs, in every thread it searches in, and restores the setting after."""

    def numpys_blas():
        return [pool for pool in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
                if "numpy" in pool.filepath]

    before = [pool.num_threads for pool in numpys_blas()]
    seen = []
    search = CompactIndex.search

    def recording(self, queries, k):
        seen.extend(pool.num_threads for pool in numpys_blas())
        return search(self, queries, k)

    monkeypatch.setattr(CompactIndex, "search", recording)
    database = random_descriptors(100)
    index = RetrievalIndex({tokens: [compact(database, width=90, coarse_keep=10, query_keep=30, candidates=20)] * 3
                            for tokens in DESCRIPTOR_TOKENS}, "compact")
    index.search({tokens: [torch.from_numpy(database[:2])] * 3 for tokens in DESCRIPTOR_TOKENS}, 3)
    assert before and len(seen) == 6 * len(before) and set(seen) == {1}
    assert [pool.num_threads for pool in numpys_blas()] == before


def test_an_index_knows_the_mode_and_settings_it_was_built_with(tmp_path):
    """What the pipeline asks before it skips a CLT's retrieval step: an index of another mode or budget, or one
    built with an earlier version's defaults (a setting it does not record), was not built with this job's."""
    settings = index_settings("compact", budget=0.2)
    assert settings == {**COMPACT_DEFAULTS, "budget": 0.2} and index_settings("exact", budget=0.2) == {}
    with pytest.raises(ValueError, match="unknown compact index settings"):
        index_settings("compact", budgett=0.2)
    per_layer = {tokens: [compact(random_descriptors(40))] for tokens in DESCRIPTOR_TOKENS}
    RetrievalIndex(per_layer, "compact", {**settings, "recall_at_10": {"cls": [1.0]}}).save(tmp_path / "r")
    index = RetrievalIndex.load(tmp_path / "r")
    assert index.built_with("compact", settings)  # what it measured besides does not count
    assert not index.built_with("compact", index_settings("compact", budget=0.1))
    assert not index.built_with("exact", index_settings("exact"))
    older = {key: value for key, value in settings.items() if key != "coarse_share"}
    assert not RetrievalIndex(per_layer, "compact", older).built_with("compact", settings)


def test_indexes_of_the_first_format_count_as_absent(tmp_path):
    """The first release's one-tier indexes do not load; the pipeline sees none and builds them again."""
    import json

    index = RetrievalIndex({tokens: [ExactIndex.build(random_descriptors(10))] for tokens in DESCRIPTOR_TOKENS},
                           "exact")
    index.save(tmp_path)
    assert RetrievalIndex.exists(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["format"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert not RetrievalIndex.exists(tmp_path)
    with pytest.raises(AssetError, match="missing keys \\['format'\\]"):
        RetrievalIndex.load(tmp_path)


def test_thumbnail_store_round_trip(tmp_path):
    data = load_dataset("synthetic", "train", n_train=12, image_size=64)
    store = build_thumbnails(data, [3, 5, 11], tmp_path, size=32, progress=False)
    again = ThumbnailStore(tmp_path)
    assert len(again) == 3 and again.labels == [3, 5, 11] and again.dataset_indices == [3, 5, 11]
    image = again.image(1)
    assert image.size == (32, 32)
    original = np.asarray(data[5][0].resize((32, 32)), dtype=float)
    assert np.abs(np.asarray(image, dtype=float) - original).mean() < 20  # JPEG of the same picture
    with pytest.raises(IndexError):
        store.image(3)


def bundle_retrieval(bundle, name):
    """Teacher, CLT, thumbnails and compact retrieval index of one CLT of a bundle."""
    teacher = bundle.load_teacher()
    store = bundle.load_thumbnails()
    return teacher, bundle.load_clt(name, teacher), store, bundle.load_index(name, len(store))


@pytest.mark.slow
def test_deeper_layers_retrieve_the_same_class_more_often(tiny_bundle):
    teacher, clt, store, index = bundle_retrieval(tiny_bundle, "relu_topk")
    test = load_dataset("synthetic", "test", n_test=200)
    rates = same_class_rates(teacher, clt, index, store.labels, test, n_queries=200, k=3)
    print("same-class rate of the top-3 per layer:", rates)
    assert rates["cls"][-1] > rates["cls"][0] + 0.05, rates
    assert rates["patches"][-1] > rates["patches"][0], rates  # patch means also carry the (random) background


@pytest.mark.slow
def test_bundle_indexes_find_each_indexed_image_and_agree_with_exact(tiny_bundle):
    teacher, clt, store, compact = bundle_retrieval(tiny_bundle, "abs_topk")
    train = load_dataset("synthetic", "train", **tiny_bundle.manifest["dataset"]["options"])
    sample = store.dataset_indices[:300]
    exact = build_retrieval(teacher, clt, train, sample, mode="exact", progress=False)
    pixels = teacher.preprocess_images([train[i][0] for i in sample[:100]])
    with torch.no_grad():
        queries = descriptors(clt.encode_sparse(teacher.capture(pixels).xs))
    found_compact, found_exact = compact.search(queries, 1), exact.search(queries, 10)
    for tokens in DESCRIPTOR_TOKENS:
        for layer in range(clt.config.n_layers):
            assert [r[0].image_id for r in found_compact[tokens][layer]] == list(range(100)), (tokens, layer)
            assert [r[0].image_id for r in found_exact[tokens][layer]] == list(range(100)), (tokens, layer)


@pytest.mark.slow
def test_static_grids_come_from_an_exact_search_of_the_whole_corpus(tiny_bundle, tmp_path):
    """The streamed exact search behind figures 4 and 5 finds what a flat FAISS index over the corpus finds."""
    from PIL import Image

    from clt_explorer.assets.evaluation_runs import bundle_split, write_retrieval_grids
    from clt_explorer.retrieval.exact import exact_neighbours

    teacher = tiny_bundle.load_teacher()
    clt = tiny_bundle.load_clt("abs_topk", teacher)
    store, train = tiny_bundle.load_thumbnails(), bundle_split(tiny_bundle, "train")
    corpus = store.dataset_indices[:400]
    queries = teacher.preprocess_images([Image.open(p).convert("RGB") for p in tiny_bundle.examples()[:3]])
    streamed = exact_neighbours(teacher, clt, train, corpus, queries, k=3, batch_size=64, progress=False)
    flat = build_retrieval(teacher, clt, train, corpus, mode="exact", progress=False)
    with torch.no_grad():
        query_descriptors = descriptors(clt.encode_sparse(teacher.capture(queries).xs))
    found = flat.search(query_descriptors, 3)
    for tokens in DESCRIPTOR_TOKENS:
        for layer in range(clt.config.n_layers):
            scores, rows = streamed[tokens][layer]
            assert rows.tolist() == [[h.image_id for h in hits] for hits in found[tokens][layer]], (tokens, layer)
            assert np.allclose(scores, [[h.score for h in hits] for hits in found[tokens][layer]], atol=1e-5)
    written = write_retrieval_grids(tiny_bundle, tmp_path, ["abs_topk"], n_queries=2)
    assert sorted(p.name for p in written) == [f"grid_abs_topk_{q}_{t}.png" for q in (0, 1) for t in ("cls", "patches")]


@pytest.mark.slow
def test_an_index_whose_rows_lose_entries_learns_from_images_spread_over_the_corpus(tiny_bundle, tmp_path):
    from clt_explorer.retrieval.build import COMPACT_DEFAULTS, compact_builder
    from clt_explorer.retrieval.exact import image_descriptors

    teacher, clt, store, _ = bundle_retrieval(tiny_bundle, "relu_topk")
    train = load_dataset("synthetic", "train", **tiny_bundle.manifest["dataset"]["options"])
    corpus, settings = store.dataset_indices[:600], {"budget": 0.3, "min_bytes": 0, "sample": 100}
    index = build_retrieval(teacher, clt, train, corpus, progress=False, **settings)
    pixels = teacher.preprocess_images([train[corpus[i]][0] for i in spread_rows(600, 100)])
    sample = image_descriptors(teacher, clt, pixels)
    assert index.indexes["patches"][0].arrays["directions"].shape[1] > 0  # patch means lose entries at this budget
    for tokens in DESCRIPTOR_TOKENS:
        for layer in range(clt.config.n_layers):
            arrays = index.indexes[tokens][layer].arrays
            codec = compact_builder(600, clt.config.n_features, {**COMPACT_DEFAULTS, **settings}, tmp_path, "x",
                                    sample[tokens][layer]).codec
            assert arrays["common_features"].tolist() == codec.common.tolist(), (tokens, layer)
            overlap = np.abs(arrays["directions"].T @ codec.directions)  # equal up to sign and float rounding
            assert np.allclose(np.diag(overlap), 1, atol=1e-3), (tokens, layer)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["relu_topk", "abs_topk", "jumprelu"])
def test_every_index_of_the_bundle_finds_at_least_95_percent_of_the_exact_top_10(tiny_bundle, name):
    """On held-out images, for every CLT, token set and layer: what the bundle's index returns against exact cosine
    search over the same descriptors of the indexed images (measured here, and by the pipeline when it built it)."""
    teacher, clt, store, index = bundle_retrieval(tiny_bundle, name)
    test = load_dataset("synthetic", "test", n_test=100)
    train = load_dataset("synthetic", "train", **tiny_bundle.manifest["dataset"]["options"])
    recall = recall_against_exact(teacher, clt, index, train, store.dataset_indices, test, 100, progress=False)
    print(name, recall)
    for tokens in DESCRIPTOR_TOKENS:
        assert min(recall[tokens]) >= 0.95, (tokens, recall[tokens])
        assert min(index.settings["recall_at_10"][tokens]) >= 0.95, index.settings
    assert index.settings["recall_queries"] == 200
