"""The FMA tree (fmm_attention.tree): padding, levels, interaction lists, partition, plans.

Coverage is counted here from the tree's own pieces (``near_range``, ``levels[*].interactions``,
``key_plan``), never from ``level_map()``, and compared with the rules of shared/spec/fma.md
re-derived in this file and in ``reference.level_map_reference``.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from fmm_attention import _config, build_tree
from fmm_attention.tree import COARSE, TOKEN, FMMTree

# (n, m): exact powers, n < 4m, n not a multiple of m, m = 1, n = 1
SIZES = [(1, 1), (1, 4), (3, 4), (7, 2), (16, 4), (17, 4), (64, 1), (100, 4), (128, 8), (129, 8),
         (300, 16), (512, 32), (1000, 32)]


def spec_padded_length(n, m):
    """N = m * 2**k, the smallest with k >= 2 and N >= n (by a search over k)."""
    return min(m * 2**k for k in range(2, 64) if m * 2**k >= n)


def spec_far_boxes(b, n_boxes, causal):
    if causal:
        listed = [b - 2] if b % 2 == 0 else [b - 3, b - 2]
    else:
        listed = [b - 2, b + 2, b + 3] if b % 2 == 0 else [b - 3, b - 2, b + 2]
    return {c for c in listed if 0 <= c < n_boxes}


def coverage_from_tree(tree):
    """(near, far) counts of how often each (query, key) pair is served, from the tree's lists.

    The causal near field keeps keys ``j <= i`` only, as the spec defines it (the kernels
    mask the rest of block ``I``).
    """
    n, m = tree.n, tree.block_size
    near = np.zeros((n, n), dtype=np.int64)
    far = np.zeros((n, n), dtype=np.int64)
    for block in range(tree.n_blocks):
        lo, hi = tree.near_range(block)
        near[block * m : min(n, (block + 1) * m), lo:hi] += 1
    if tree.causal:
        near[np.triu_indices(n, 1)] = 0
    for level in tree.levels:
        w = level.box_size
        for i in range(n):
            for c in level.interactions[i // w]:
                if c >= 0:
                    far[i, c * w : min(n, (c + 1) * w)] += 1
    return near, far


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m", SIZES)
def test_partition_every_allowed_pair_served_exactly_once(n, m, causal):
    tree = build_tree(n, block_size=m, rank=2, causal=causal)
    near, far = coverage_from_tree(tree)
    total = near + far
    allowed = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    assert (total[allowed] == 1).all(), np.argwhere(allowed & (total != 1))[:5]
    assert (total[~allowed] == 0).all()
    assert (far[~allowed] == 0).all(), "a causal far field reaches a future key"


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 260), log_m=st.integers(0, 5), causal=st.booleans())
def test_partition_random_sizes(n, log_m, causal):
    tree = build_tree(n, block_size=2**log_m, rank=1, causal=causal)
    near, far = coverage_from_tree(tree)
    allowed = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    np.testing.assert_array_equal(near + far, allowed.astype(np.int64))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m", [(32, 1), (64, 4), (256, 8)])
def test_partition_on_padded_length(n, m, causal):
    """On n = N the lists tile the whole padded square, and near fields are 3m (causal 2m) wide."""
    tree = build_tree(n, block_size=m, rank=1, causal=causal)
    assert tree.padded_length == n
    near, far = coverage_from_tree(tree)
    allowed = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    np.testing.assert_array_equal(near + far, allowed.astype(np.int64))
    for block in range(1, tree.n_blocks - 1):
        lo, hi = tree.near_range(block)
        assert hi - lo == (2 * m if causal else 3 * m)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m", SIZES[:-2] + [(200, 8)])
def test_level_map_matches_reference(n, m, causal):
    got = build_tree(n, block_size=m, rank=4, causal=causal).level_map()
    assert got.shape == (n, n)
    np.testing.assert_array_equal(got, reference.level_map_reference(n, m, causal))


@pytest.mark.parametrize("causal", [False, True])
def test_level_map_independent_of_rank(causal):
    maps = [build_tree(90, block_size=4, rank=p, causal=causal).level_map() for p in (1, 2, 8, 64)]
    for other in maps[1:]:
        np.testing.assert_array_equal(maps[0], other)


def test_level_map_refuses_huge_n():
    tree = build_tree(_config.DENSE_MAX_N + 1, block_size=32, rank=2)
    with pytest.raises(ValueError, match="level_map"):
        tree.level_map()


@pytest.mark.parametrize("m", [1, 2, 4, 8, 32])
def test_padded_length_rules(m):
    for n in list(range(1, 300)) + [511, 512, 513, 1000, 1024, 1025, 4097]:
        tree = build_tree(n, block_size=m, rank=2)
        N = tree.padded_length
        # a block past the sequence is clamped to the smallest power of two >= n (all near field)
        me = min(m, 1 << (n - 1).bit_length())
        assert tree.block_size == me
        assert N == spec_padded_length(n, me), (n, m)
        k = (N // me).bit_length() - 1
        assert N == me * 2**k and k >= 2 and N >= n
        assert n <= 4 * me or N < 2 * n  # smallest such length
        assert tree.n_levels == k - 1
        assert tree.n_blocks == -(-n // me)


@pytest.mark.parametrize("n, m, p", [(1, 1, 1), (5, 4, 8), (100, 4, 2), (1000, 32, 4), (1024, 8, 64), (300, 2, 1)])
def test_levels_geometry(n, m, p):
    tree = build_tree(n, block_size=m, rank=p)
    N = tree.padded_length
    offset = 0
    for index, level in enumerate(tree.levels, start=1):
        assert level.index == index
        assert level.box_size == m * 2 ** (index - 1)
        assert level.n_boxes * level.box_size == N
        assert level.rank == min(p, level.box_size)
        assert level.sub_box_size * level.rank == level.box_size
        assert level.offset == offset
        assert level.interactions.shape == (level.n_boxes, 3)
        offset += level.n_boxes * level.rank
    assert tree.levels[0].box_size == m
    assert tree.levels[-1].box_size == N // 4
    assert tree.n_coarse == offset


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m", [(16, 4), (100, 4), (1000, 8)])
def test_interaction_lists_follow_spec(n, m, causal):
    tree = build_tree(n, block_size=m, rank=2, causal=causal)
    for level in tree.levels:
        assert not level.interactions.flags.writeable
        for b in range(level.n_boxes):
            row = level.interactions[b]
            listed = [c for c in row if c >= 0]
            assert len(set(listed)) == len(listed)
            assert set(listed) == spec_far_boxes(b, level.n_boxes, causal)
            assert all(c == -1 for c in row[len(listed):])  # -1 only pads the end


def plan_coverage(tree, ptr, segments):
    """For each query, how often each key is reached through the plan (coarse rows mapped back)."""
    n, m = tree.n, tree.block_size
    row_owner = []  # coarse row -> (level, first token of its box, first and last token of its sub-box)
    for level in tree.levels:
        w, r = level.box_size, level.rank
        for row in range(level.n_boxes * r):
            c, t = divmod(row, r)
            first = c * w + t * level.sub_box_size
            row_owner.append((level.index, c * w, first, first + level.sub_box_size))
    assert len(row_owner) == tree.n_coarse
    cover = np.zeros((n, n), dtype=np.int64)
    levels_seen = np.full((n, n), -1)
    for block in range(tree.n_blocks):
        rows = slice(block * m, min(n, (block + 1) * m))
        for kind, start, count in segments[ptr[block] : ptr[block + 1]]:
            if kind == TOKEN:
                assert 0 <= start and start + count <= n
                cover[rows, start : start + count] += 1
                levels_seen[rows, start : start + count] = 0
            else:
                assert kind == COARSE and 0 <= start and start + count <= tree.n_coarse
                for row in range(start, start + count):
                    index, box_first, first, last = row_owner[row]
                    assert box_first < n, "a box of padding only was planned"
                    cover[rows, first : min(n, last)] += 1
                    levels_seen[rows, first : min(n, last)] = index
    return cover, levels_seen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m, p", [(1, 4, 2), (7, 2, 1), (50, 4, 2), (100, 4, 8), (257, 16, 4), (300, 8, 64)])
def test_key_plan_partitions_and_matches_level_map(n, m, p, causal):
    tree = build_tree(n, block_size=m, rank=p, causal=causal)
    ptr, segments, max_keys = tree.key_plan
    assert ptr.shape == (tree.n_blocks + 1,) and ptr[0] == 0 and ptr[-1] == len(segments)
    assert (np.diff(ptr) >= 1).all()
    assert not ptr.flags.writeable and not segments.flags.writeable
    per_block = [segments[ptr[b] : ptr[b + 1], 2].sum() for b in range(tree.n_blocks)]
    assert max_keys == max(per_block)
    for block in range(tree.n_blocks):
        first = segments[ptr[block]]
        assert first[0] == TOKEN and tuple(first[1:]) == (lambda lo, hi: (lo, hi - lo))(*tree.near_range(block))
        for kind, start, count in segments[ptr[block] + 1 : ptr[block + 1]]:
            assert kind == COARSE
    cover, levels_seen = plan_coverage(tree, ptr, segments)
    level_map = reference.level_map_reference(n, m, causal)
    if causal:  # the near segment runs to the end of block I; kernels mask keys after the query
        future = np.triu(np.ones((n, n), bool), 1)
        assert (levels_seen[future] <= 0).all()
        cover[future] = 0
        levels_seen[future] = -1
    assert (cover[level_map >= 0] == 1).all()
    np.testing.assert_array_equal(levels_seen, level_map)


@pytest.mark.parametrize("n, m, p", [(1, 4, 2), (100, 4, 2), (300, 8, 64)])
def test_near_plan_and_box_tables(n, m, p):
    tree = build_tree(n, block_size=m, rank=p)
    ptr, segments, max_keys = tree.near_plan
    assert (segments[:, 0] == TOKEN).all() and len(segments) == tree.n_blocks
    assert max_keys == max(hi - lo for lo, hi in map(tree.near_range, range(tree.n_blocks)))
    box_offset, table = tree.box_tables
    assert box_offset[0] == 0 and len(box_offset) == tree.n_levels + 1
    for i, level in enumerate(tree.levels):
        rows = table[box_offset[i] : box_offset[i + 1]]
        assert rows.shape == (level.n_boxes, 3)
        for b in range(level.n_boxes):
            want = sorted(level.offset + c * level.rank
                          for c in spec_far_boxes(b, level.n_boxes, False) if c * level.box_size < n)
            assert sorted(x for x in rows[b] if x >= 0) == want


def test_tree_is_cached_and_immutable():
    a = build_tree(100, block_size=4, rank=2, causal=True)
    assert build_tree(100, block_size=4, rank=2, causal=True) is a
    assert build_tree(100, block_size=4, rank=2, causal=False) is not a
    assert isinstance(a, FMMTree) and "padded_length=128" in repr(a)
    with pytest.raises(AttributeError):
        a.n = 5


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n=0, block_size=4, rank=2), ValueError, "n must be at least 1"),
        (dict(n=-3, block_size=4, rank=2), ValueError, "n must be at least 1"),
        (dict(n=10.0, block_size=4, rank=2), TypeError, "n must be an integer"),
        (dict(n=True, block_size=4, rank=2), TypeError, "n must be an integer"),
        (dict(n=2**41, block_size=4, rank=2), ValueError, "n="),
        (dict(n=10, block_size=3, rank=2), ValueError, "block_size"),
        (dict(n=10, block_size=0, rank=2), ValueError, "block_size"),
        (dict(n=10, block_size=-4, rank=2), ValueError, "block_size"),
        (dict(n=10, block_size=4.0, rank=2), TypeError, "block_size"),
        (dict(n=10, block_size="4", rank=2), TypeError, "block_size"),
        (dict(n=10, block_size=4, rank=6), ValueError, "rank"),
        (dict(n=10, block_size=4, rank=0), ValueError, "rank"),
        (dict(n=10, block_size=4, rank=None), TypeError, "rank"),
        (dict(n=10, block_size=4, rank=2, causal=1), TypeError, "causal"),
        (dict(n=10, block_size=4, rank=2, causal="no"), TypeError, "causal"),
    ],
)
def test_build_tree_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_tree(**kwargs)


def test_build_tree_accepts_numpy_integers():
    a = build_tree(np.int64(100), block_size=np.int32(4), rank=np.uint8(2), causal=np.bool_(True))
    assert (a.n, a.block_size, a.rank, a.causal) == (100, 4, 2, True)
    assert type(a.n) is int and type(a.block_size) is int


def loop_plan(tree, with_far, global_tokens):
    """The key plan built block by block from the spec's rules (the library builds it for
    all blocks at once with array operations; this is its oracle, order included)."""
    m, n = tree.block_size, tree.n
    ptr, rows = [0], []
    for block in range(tree.n_blocks):
        lo = max(0, (block - 1) * m)
        hi = min(n, (block + (1 if tree.causal else 2)) * m)
        block_rows = [(TOKEN, lo, hi - lo)]
        outside = [g for g in global_tokens if not lo <= g < hi and not (tree.causal and g >= hi)]
        while outside:  # consecutive global tokens form one segment
            run = 1
            while run < len(outside) and outside[run] == outside[0] + run:
                run += 1
            block_rows.append((TOKEN, outside[0], run))
            outside = outside[run:]
        if with_far:
            for level in tree.levels:
                b = block * m // level.box_size
                listed = [b - 2] if b % 2 == 0 else [b - 3, b - 2]
                if not tree.causal:
                    listed = [b - 2, b + 2, b + 3] if b % 2 == 0 else [b - 3, b - 2, b + 2]
                for c in listed:
                    if 0 <= c < level.n_boxes and c * level.box_size < n:
                        block_rows.append((COARSE, level.offset + c * level.rank, level.rank))
        rows += block_rows
        ptr.append(len(rows))
    max_keys = max(sum(r[2] for r in rows[a:b]) for a, b in itertools.pairwise(ptr))
    return np.array(ptr), np.array(rows, dtype=np.int64).reshape(-1, 3), max_keys


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m, p", [(1, 1, 1), (3, 4, 2), (100, 4, 2), (129, 8, 4), (1000, 32, 2), (777, 2, 8)])
@pytest.mark.parametrize("global_tokens", [(), (0,), (0, 1, 2, 50, 51, 98), (5, 40, 41, 42, 99)])
def test_plan_matches_block_by_block_oracle(n, m, p, causal, global_tokens):
    tree = build_tree(n, block_size=m, rank=p, causal=causal)
    global_tokens = tuple(g for g in global_tokens if g < n)
    for with_far in (True, False):
        ptr, segments, max_keys = tree.plan(with_far=with_far, global_tokens=global_tokens)
        ref_ptr, ref_segments, ref_max = loop_plan(tree, with_far, global_tokens)
        np.testing.assert_array_equal(ptr, ref_ptr)
        np.testing.assert_array_equal(segments, ref_segments)
        assert max_keys == ref_max


@pytest.mark.parametrize("causal", [False, True])
def test_interaction_lists_keep_the_spec_order(causal):
    for level in build_tree(1000, block_size=4, rank=2, causal=causal).levels:
        for b in range(level.n_boxes):
            listed = [b - 2] if b % 2 == 0 else [b - 3, b - 2]
            if not causal:
                listed = [b - 2, b + 2, b + 3] if b % 2 == 0 else [b - 3, b - 2, b + 2]
            listed = [c for c in listed if 0 <= c < level.n_boxes]
            assert list(level.interactions[b]) == listed + [-1] * (3 - len(listed))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m, p", [(100, 4, 2), (1000, 32, 4), (129, 8, 8)])
def test_far_segments_are_the_key_plans_coarse_segments(n, m, p, causal):
    tree = build_tree(n, block_size=m, rank=p, causal=causal)
    ptr, segments, _ = tree.key_plan
    for block in range(tree.n_blocks):
        planned = [(int(s), int(c)) for kind, s, c in segments[ptr[block]:ptr[block + 1]] if kind == COARSE]
        listed = tree.far_segments(block)
        assert [(start, count) for start, count, _ in listed] == planned
        for start, count, level in listed:  # each segment is one box of its level
            lv = tree.levels[level - 1]
            assert count == lv.rank and lv.offset <= start < lv.offset + lv.n_boxes * lv.rank


# --------------------------------------------------------------------------- issue 13: sizes bounded
@pytest.mark.parametrize("block_size, want", [(64, 64), (128, 128), (256, 128), (2**24, 128), (2**62, 128)])
def test_issue13_block_size_clamped_to_the_sequence(block_size, want):
    # a block past the sequence is all near field; the tree must not grow with it
    tree = build_tree(100, block_size=block_size, rank=2**40)
    assert tree.block_size == want and tree.padded_length == 4 * want
    assert tree.n_coarse <= 4 * want and tree.n_levels == (1 if want == 128 else tree.n_levels)


def test_issue13_build_tree_memory_check_uses_the_configured_limit(monkeypatch):
    from fmm_attention import _config
    from fmm_attention.tree import memory_limit, tree_bytes

    assert memory_limit() > 2**20
    need = tree_bytes(2**16, 4, 2)
    assert tree_bytes(2**17, 4, 2) > need > 0
    monkeypatch.setattr(_config, "MAX_CALL_BYTES", need // 2)
    with pytest.raises(ValueError, match="n=65536 needs about"):
        build_tree(2**16, block_size=4, rank=2)
    monkeypatch.setattr(_config, "MAX_CALL_BYTES", need * 2)
    assert build_tree(2**16, block_size=4, rank=2).n == 2**16
