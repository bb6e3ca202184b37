"""fmm_attention.analysis and ``python -m fmm_attention analyze``.

The implied attention matrix is checked against the plain-NumPy oracle in
``tests/reference.py`` and against the kernels' outputs (``implied @ v``); the metrics
against hand computations; the bounds on random inputs (sharp and flat, causal, masked,
coarse queries, no count scaling) and on real MiniLM heads from ``../shared/data``.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from fmm_attention import ClusterCoarsening, LearnedCoarsening, MeanCoarsening, build_tree, fmm_attention
from fmm_attention import _config
from fmm_attention.analysis import attention_matrix, compare, far_field_rank_study
from fmm_attention.cli import main

from reference import exact_reference, fma_implied_matrix

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _inputs(shape, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    return tuple(spread * rng.standard_normal(shape) for _ in range(3))


# --------------------------------------------------------------------------- matrices
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_exact_matrix_is_masked_softmax(causal, masked):
    q, k, v = _inputs((37, 5), seed=1)
    valid = np.random.default_rng(2).random(37) > 0.3 if masked else None
    p = attention_matrix(q, k, causal=causal, key_padding_mask=valid)
    out, _ = exact_reference(q, k, v, causal=causal, valid=valid)
    np.testing.assert_allclose(p @ v, out, atol=1e-13)
    allowed = np.ones((37, 37), bool) if valid is None else np.broadcast_to(valid, (37, 37))
    if causal:
        allowed = allowed & np.tri(37, dtype=bool)
    np.testing.assert_allclose(p.sum(axis=1), allowed.any(axis=1).astype(float), atol=1e-13)
    if causal:
        assert not np.any(np.triu(p, 1))
    if masked:
        assert not np.any(p[:, ~valid])


@pytest.mark.parametrize(
    "n, m, p, causal, count_scaling, masked",
    [(64, 4, 2, False, True, False), (77, 2, 4, True, True, True), (100, 4, 1, False, False, True),
     (33, 1, 2, True, False, False), (128, 8, 4, False, True, True)],
)
def test_implied_matrix_matches_reference(n, m, p, causal, count_scaling, masked):
    q, k, _ = _inputs((n, 6), seed=n, spread=1.5)
    valid = np.random.default_rng(n).random(n) > 0.25 if masked else None
    ours = attention_matrix(q, k, method="fmm", block_size=m, rank=p, causal=causal,
                            count_scaling=count_scaling, key_padding_mask=valid)
    ref = fma_implied_matrix(q, k, block_size=m, rank=p, causal=causal, count_scaling=count_scaling, valid=valid)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "causal, masked, count_scaling, query_coarsening",
    [(False, False, True, False), (True, False, True, False), (False, True, True, False),
     (True, True, False, False), (False, False, True, True), (False, True, False, True)],
)
@pytest.mark.parametrize("n, m, p", [(96, 4, 2), (131, 8, 1), (64, 2, 4)])
def test_implied_matrix_times_v_is_fma_output(n, m, p, causal, masked, count_scaling, query_coarsening):
    q, k, v = _inputs((2, n, 8), seed=7 * n + m, spread=1.3)
    valid = np.random.default_rng(n).random((2, n)) > 0.3 if masked else None
    options = dict(block_size=m, rank=p, causal=causal, count_scaling=count_scaling,
                   query_coarsening=query_coarsening, key_padding_mask=valid)
    implied = attention_matrix(q, k, method="fmm", **options)
    assert implied.shape == (2, n, n)
    np.testing.assert_allclose(implied @ v, fmm_attention(q, k, v, **options), rtol=0, atol=1e-12)


def test_full_rank_makes_implied_matrix_exact():
    q, k, _ = _inputs((100, 8), seed=3, spread=2.0)
    for causal in (False, True):
        exact = attention_matrix(q, k, causal=causal)
        implied = attention_matrix(q, k, method="fmm", block_size=4, rank=32, causal=causal)  # N = 128
        np.testing.assert_allclose(implied, exact, atol=1e-14)


def test_rows_without_valid_key_are_zero():
    q, k, v = _inputs((40, 4), seed=4)
    valid = np.zeros(40, bool)
    valid[30:] = True
    p = attention_matrix(q, k, method="fmm", block_size=4, rank=2, causal=True, key_padding_mask=valid)
    assert not np.any(p[:30])
    np.testing.assert_allclose(p[30:].sum(axis=1), 1.0)


def test_float32_inputs_are_analysed_in_float64():
    q, k, v = _inputs((64, 8), seed=5)
    p32 = attention_matrix(q.astype(np.float32), k.astype(np.float32), method="fmm", block_size=4, rank=2)
    p64 = attention_matrix(q.astype(np.float32).astype(np.float64), k.astype(np.float32).astype(np.float64),
                           method="fmm", block_size=4, rank=2)
    assert p32.dtype == np.float64
    np.testing.assert_array_equal(p32, p64)


def test_mean_coarsening_instance_is_the_string():
    # The coarsening protocol, not the string, says what the analysis can express.
    q, k, v = _inputs((32, 4))
    by_name = attention_matrix(q, k, method="fmm", block_size=4, rank=2, coarsening="mean")
    by_object = attention_matrix(q, k, method="fmm", block_size=4, rank=2, coarsening=MeanCoarsening())
    np.testing.assert_array_equal(by_object, by_name)
    with pytest.raises(ValueError, match="cluster"):
        attention_matrix(q, k, method="fmm", block_size=4, rank=2, coarsening=ClusterCoarsening(2))


# --------------------------------------------------------------------------- errors
def test_learned_coarsening_has_no_token_matrix():
    weights = [np.full((2 * 4, 1, w), 1.0 / w) for w in (4, 8)]
    coarse = LearnedCoarsening(weights, weights)
    q, k, v = _inputs((32, 4))
    for call in (lambda: attention_matrix(q, k, method="fmm", block_size=4, rank=2, coarsening=coarse),
                 lambda: compare(q, k, v, block_size=4, rank=2, coarsening=coarse),
                 lambda: far_field_rank_study(q, k, block_size=4, rank=2, coarsening=coarse)):
        with pytest.raises(ValueError, match="no token-level attention matrix"):
            call()


def test_argument_errors(monkeypatch):
    q, k, v = _inputs((64, 4))
    with pytest.raises(ValueError, match="method"):
        attention_matrix(q, k, method="approx")
    with pytest.raises(ValueError, match="query_coarsening"):
        attention_matrix(q, k, method="fmm", causal=True, query_coarsening=True)
    with pytest.raises(ValueError, match="block_size"):
        compare(q, k, v, block_size=3)
    with pytest.raises(ValueError, match="coarsening"):
        compare(q, k, v, coarsening="max")
    with pytest.raises(TypeError, match="causal"):
        attention_matrix(q, k, causal=1)
    with pytest.raises(ValueError, match="sequence length"):
        compare(q, k, v[:10])
    monkeypatch.setattr(_config, "DENSE_MAX_N", 32)
    with pytest.raises(ValueError, match=r"n=64 exceeds .*DENSE_MAX_N=32"):
        attention_matrix(q, k)


# --------------------------------------------------------------------------- metrics
def test_metrics_on_a_case_solved_by_hand():
    """n = 8, m = 1, p = 1, d = 1, scale 1, every query 1, keys 0 except k4 = a, k5 = -a.

    Queries 0 and 1 see keys 4 and 5 through one level-2 coarse key (their mean, 0), so
    their implied weights are uniform, 1/8, while the exact weights are (1, .., e^a, e^-a,
    1, 1) / Z with Z = 6 + 2 cosh a. With v = e_4 - e_5 (dv = 1) everything is explicit.
    """
    a = 1.0
    n = 8
    q = np.ones((n, 1))
    k = np.zeros((n, 1))
    k[4], k[5] = a, -a
    v = np.zeros((n, 1))
    v[4], v[5] = 1.0, -1.0
    tree = build_tree(n, block_size=1, rank=1)
    np.testing.assert_array_equal(tree.level_map()[0], [0, 0, 1, 1, 2, 2, 2, 2])
    head = compare(q, k, v, block_size=1, rank=1, scale=1.0)[0]

    Z = 6 + 2 * np.cosh(a)
    p = np.array([1, 1, 1, 1, np.exp(a), np.exp(-a), 1, 1]) / Z
    for i in (0, 1):
        np.testing.assert_allclose(head.kl[i], np.sum(p * np.log(8 * p)), rtol=1e-12)
        np.testing.assert_allclose(head.tv[i], 0.5 * np.abs(p - 1 / 8).sum(), rtol=1e-12)
        np.testing.assert_allclose(head.row_error[i], 2 * np.sinh(a) / Z, rtol=1e-12)
        np.testing.assert_allclose(head.max_perturbation[i], a, rtol=1e-12)
        # Theorem 1 (a): even part 0, odd part (1/8) sinh a (1 + 1), denominator (6 + 2e^-a)/8
        np.testing.assert_allclose(head.bound[i], 2 * np.sinh(a) / (6 + 2 * np.exp(-a)), rtol=1e-12)
        np.testing.assert_allclose(head.tv_bound[i], np.tanh(a / 2), rtol=1e-12)
    assert head.bound_held and head.tv_bound_held


def test_metrics_match_direct_computation():
    q, k, v = _inputs((3, 90, 6), seed=11, spread=1.4)
    options = dict(block_size=4, rank=2, causal=True)
    report = compare(q, k, v, **options)
    tree = build_tree(90, block_size=4, rank=2, causal=True)
    levels = tree.level_map()
    for b, head in enumerate(report):
        assert head.index == (b,)
        p = attention_matrix(q[b], k[b], causal=True)
        pt = attention_matrix(q[b], k[b], method="fmm", **options)
        out, approx = p @ v[b], fmm_attention(q[b], k[b], v[b], **options)
        np.testing.assert_allclose(head.rel_fro_error, np.linalg.norm(approx - out) / np.linalg.norm(out), rtol=1e-10)
        np.testing.assert_allclose(head.max_abs_error, np.abs(approx - out).max(), rtol=1e-10)
        np.testing.assert_allclose(head.row_error, np.linalg.norm(approx - out, axis=1), rtol=1e-9, atol=1e-14)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p > 0, p * np.log(p / pt), 0.0).sum(axis=1)
        np.testing.assert_allclose(head.kl, kl, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(head.tv, 0.5 * np.abs(p - pt).sum(axis=1), rtol=1e-12)
        np.testing.assert_allclose(head.spectral_error, np.linalg.svd(pt - p, compute_uv=False)[0], rtol=1e-10)
        np.testing.assert_allclose(head.spectral_rel_error * np.linalg.svd(p, compute_uv=False)[0],
                                   head.spectral_error, rtol=1e-10)
        for level in range(tree.n_levels + 1):
            served = levels == level
            np.testing.assert_allclose(head.level_mass[level], p[served].sum() / 90, rtol=1e-12)
            np.testing.assert_allclose(head.level_error_share[level],
                                       np.abs(pt - p)[served].sum() / np.abs(pt - p).sum(), rtol=1e-12)
        # max_j delta_ij, delta_ij = s |q_i . (kc - k_j)| over far pairs, kc the sub-box mean
        s = 1 / np.sqrt(6)
        delta = np.zeros((90, 90))
        for lv in tree.levels:
            sub = lv.sub_box_size
            kc = np.array([k[b][(j // sub) * sub:min(90, (j // sub + 1) * sub)].mean(axis=0) for j in range(90)])
            d = np.abs(s * (q[b] @ kc.T - q[b] @ k[b].T))
            delta = np.where(levels == lv.index, d, delta)
        np.testing.assert_allclose(head.max_perturbation, delta.max(axis=1), rtol=1e-10, atol=1e-14)
    summary = report.summary()
    assert summary["n_heads"] == 3
    values = [h.rel_fro_error for h in report]
    assert summary["rel_fro_error"]["median"] == pytest.approx(np.median(values))
    assert summary["rel_fro_error"]["max"] == pytest.approx(max(values))


def test_spectral_norm_of_large_matrix_uses_arpack_correctly():
    q, k, v = _inputs((200, 8), seed=12, spread=1.5)
    head = compare(q, k, v, block_size=8, rank=2)[0]
    p = attention_matrix(q, k)
    pt = attention_matrix(q, k, method="fmm", block_size=8, rank=2)
    np.testing.assert_allclose(head.spectral_error, np.linalg.svd(pt - p, compute_uv=False)[0], rtol=1e-10)


def test_identical_attention_has_zero_kl_and_tv():
    q, k, v = _inputs((2, 100, 8), seed=13, spread=2.0)
    for causal in (False, True):
        report = compare(q, k, v, block_size=4, rank=32, causal=causal)  # rank >= N/4: exact
        for head in report:
            assert np.all(np.abs(head.kl) < 1e-14) and np.all(head.tv < 1e-14)
            assert head.rel_fro_error < 1e-13 and head.spectral_error < 1e-13
            assert np.all(head.max_perturbation < 1e-13) and np.all(head.bound < 1e-12)
            assert head.bound_held and head.tv_bound_held
            assert np.isnan(head.bound_ratio)
        summary = report.summary()
        assert np.isnan(summary["bound_ratio"]["median"])


def test_level_shares_sum_to_one():
    q, k, v = _inputs((4, 120, 8), seed=14)
    for head in compare(q, k, v, block_size=8, rank=2):
        assert head.level_mass.shape == (4,)
        np.testing.assert_allclose(head.level_mass.sum(), 1.0)
        np.testing.assert_allclose(head.level_error_share.sum(), 1.0)
        assert 0 < head.far_mass < 1


def test_report_serialises():
    q, k, v = _inputs((2, 3, 64, 4), seed=15)
    report = compare(q, k, v, block_size=4, rank=2)
    assert len(report) == 6 and report.lead_shape == (2, 3)
    assert [h.index for h in report] == [(i, j) for i in range(2) for j in range(3)]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["box_sizes"] == [4, 4, 8, 16]
    assert len(data["heads"][0]["bound"]) == 64
    assert "bound" not in report.to_dict(rows=False)["heads"][0]
    text = report.format(labels=[f"L{i}" for i in range(6)])
    assert "L5" in text and "held for every query" in text
    assert str(report).startswith("head")


# --------------------------------------------------------------------------- bounds
BOUND_CASES = [
    dict(block_size=4, rank=1),
    dict(block_size=4, rank=2, causal=True),
    dict(block_size=8, rank=4, masked=True),
    dict(block_size=2, rank=2, causal=True, masked=True),
    dict(block_size=4, rank=2, count_scaling=False),
    dict(block_size=4, rank=2, query_coarsening=True, masked=True),
    dict(block_size=16, rank=8, causal=True),
]


@pytest.mark.parametrize("case", BOUND_CASES)
@pytest.mark.parametrize("spread", [0.5, 2.0, 6.0])
def test_bounds_hold_on_random_inputs(case, spread):
    case = dict(case)
    masked = case.pop("masked", False)
    rng = np.random.default_rng(int(spread * 10) + case["block_size"])
    n = 150
    q, k, v = (spread * rng.standard_normal((3, n, 8)) for _ in range(3))
    k[:, 7] += 3.0  # a sink-like key: large logits, far from its sub-box mean
    valid = rng.random((3, n)) > 0.3 if masked else None
    report = compare(q, k, v, key_padding_mask=valid, **case)
    for head in report:
        assert head.bound_held and head.tv_bound_held
        assert np.all(head.row_error <= head.bound * (1 + 1e-9) + 1e-12)
        assert np.all(head.tv <= head.tv_bound + 1e-12)
        finite = np.isfinite(head.bound) & (head.row_error > 1e-9)
        assert np.median(head.bound[finite] / head.row_error[finite]) < 1e3  # useful, not vacuous


def _real_heads():
    path = DATA / "minilm_Apache-2_0.npz"
    if not path.is_file():
        pytest.skip(f"real data not found at {path}")
    with np.load(path) as data:
        pick = (np.array([0, 2, 5]), np.array([0, 5, 9]))  # (layer, head) pairs
        return tuple(np.asarray(data[name])[pick][:, :256] for name in ("q", "k", "v"))


@pytest.mark.parametrize("options", [dict(block_size=16, rank=2), dict(block_size=8, rank=4, causal=True),
                                     dict(block_size=32, rank=8), dict(block_size=4, rank=1, causal=True)])
def test_bounds_hold_on_real_heads(options):
    q, k, v = _real_heads()
    report = compare(q, k, v, **options)
    summary = report.summary()
    assert summary["bound_held"] and summary["tv_bound_held"]
    assert 1 <= summary["bound_ratio"]["median"] < 100


def test_bounds_hold_on_real_heads_with_mask():
    q, k, v = _real_heads()
    valid = np.ones(q.shape[:2], bool)
    valid[:, 200:] = False  # padding at the end, as a tokenizer's batch would have
    valid[1, 3:40:3] = False
    report = compare(q, k, v, block_size=8, rank=2, key_padding_mask=valid)
    assert all(h.bound_held and h.tv_bound_held for h in report)


# --------------------------------------------------------------------------- rank study
@pytest.mark.parametrize("causal", [False, True])
def test_rank_study_blocks_and_eckart_young(causal):
    q, k, _ = _inputs((2, 100, 6), seed=21, spread=1.5)
    study = far_field_rank_study(q, k, block_size=4, rank=2, causal=causal)
    tree = build_tree(100, block_size=4, rank=2, causal=causal)
    levels = tree.level_map()
    assert [lv.level for lv in study.levels] == [lv.index for lv in tree.levels]
    for lv in study.levels:
        w = lv.box_size
        covered = np.zeros_like(levels, dtype=bool)
        for qb, kb in lv.blocks:
            covered[qb * w:(qb + 1) * w, kb * w:(kb + 1) * w] = True
        np.testing.assert_array_equal(covered, levels == lv.level)  # the blocks tile the level
        sv = lv.singular_values
        assert sv.shape == (2, len(lv.blocks), w)
        assert np.all(np.diff(sv, axis=-1) <= 1e-12)
        assert np.all(lv.fma_error >= lv.best_error - 1e-12)
        assert np.all(lv.fma_spectral_error >= lv.best_spectral_error - 1e-12)
        np.testing.assert_allclose(lv.block_norm ** 2, (sv ** 2).sum(axis=-1))
        if lv.rank >= w:
            assert np.all(lv.best_error < 1e-12)
    p = attention_matrix(q[1], k[1], causal=causal)
    lv = study.levels[-1]
    (qb, kb), w = lv.blocks[0], lv.box_size
    block = np.zeros((w, w))
    rows, cols = p[qb * w:(qb + 1) * w, kb * w:(kb + 1) * w].shape
    block[:rows, :cols] = p[qb * w:(qb + 1) * w, kb * w:(kb + 1) * w]
    sv = np.linalg.svd(block, compute_uv=False)
    np.testing.assert_allclose(lv.singular_values[1, 0], sv, atol=1e-14)
    np.testing.assert_allclose(lv.best_error[1, 0], np.sqrt((sv[lv.rank:] ** 2).sum()), atol=1e-14)
    summary = study.summary()
    assert all(s["excess"] >= 1 for s in summary)
    json.dumps(study.to_dict())


def test_rank_study_full_rank_is_exact():
    q, k, _ = _inputs((64, 4), seed=22)
    study = far_field_rank_study(q, k, block_size=4, rank=16)  # N = 64: rank >= N/4
    for lv in study.levels:
        assert np.all(lv.fma_error < 1e-14) and np.all(lv.best_error < 1e-12)


# --------------------------------------------------------------------------- command line
@pytest.fixture
def small_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "heads.npz"
    q, k, v = (rng.standard_normal((2, 3, 64, 8)).astype(np.float32) for _ in range(3))
    np.savez(path, q=q, k=k, v=v)
    return path


def test_cli_analyze(small_npz, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["analyze", str(small_npz), "--block-size", "4", "--rank", "2", "--layers", "1",
                 "--heads", "0,2", "--causal", "--json", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "1,0" in captured.out and "1,2" in captured.out and "0,1" not in captured.out
    assert "held for every query" in captured.out
    data = json.loads(out.read_text())
    assert data["labels"] == ["1,0", "1,2"] and data["options"]["causal"] is True
    assert len(data["heads"]) == 2


def test_cli_progress_fallback(small_npz, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert main(["analyze", str(small_npz), "--block-size", "8", "--rank", "1", "--heads", "1"]) == 0
    captured = capsys.readouterr()
    assert "analyze: head 2/2" in captured.err


@pytest.mark.slow
def test_cli_plot(small_npz, tmp_path):
    pytest.importorskip("matplotlib")
    figures = tmp_path / "figures"
    assert main(["analyze", str(small_npz), "--block-size", "4", "--rank", "2", "--plot", str(figures),
                 "--no-progress"]) == 0
    names = sorted(p.name for p in figures.iterdir())
    assert names == ["attention.png", "error_by_head.png", "error_by_level.png", "level_map.png",
                     "singular_values.png"]
    assert all((figures / name).stat().st_size > 1000 for name in names)


def test_cli_plot_without_matplotlib(small_npz, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["analyze", str(small_npz), "--plot", str(tmp_path / "figs"), "--no-progress"]) == 2
    assert "pip install 'fmm_attention[plot]'" in capsys.readouterr().err


def test_cli_errors(small_npz, tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", q=np.zeros((4, 2)), k=np.zeros((4, 2)))
    assert main(["analyze", str(tmp_path / "bad.npz")]) == 2
    assert "lacks array(s) v" in capsys.readouterr().err
    assert main(["analyze", str(small_npz), "--heads", "5", "--no-progress"]) == 2
    assert "--heads: index 5 is out of range" in capsys.readouterr().err
    assert main(["analyze", str(small_npz), "--block-size", "3", "--no-progress"]) == 2
    assert "block_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", str(small_npz), "--layers", "2-1"])
    assert "0,2-4" in capsys.readouterr().err


def test_cluster_coarsening_is_rejected():
    q, k, v = _inputs((64, 4))
    with pytest.raises(ValueError, match="coarsening='cluster' is not supported"):
        compare(q, k, v, block_size=4, rank=2, coarsening="cluster")


@pytest.mark.parametrize("progress", [5, "tqdm"])
def test_compare_rejects_a_progress_that_is_not_callable(progress):
    q, k, v = _inputs((2, 32, 4))
    with pytest.raises(TypeError, match="progress must be None or a callable"):
        compare(q, k, v, block_size=4, rank=2, progress=progress)


def test_compare_reports_progress_by_the_one_contract():
    # progress(label) once after each head, like accuracy_vs_cost and perf.scaling_study
    q, k, v = _inputs((3, 32, 4))
    labels = []
    compare(q, k, v, block_size=4, rank=2, progress=labels.append)
    assert labels == ["head 0", "head 1", "head 2"]
