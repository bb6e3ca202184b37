"""The training study (docs/study/train_lm.py): a tiny model trained a few steps through the
PyTorch adapter; its learned coarsening, saved as a state dict and loaded into
``LearnedCoarsening``, reproduces the model's attention outputs in the NumPy API. Also the
corpus split and the windowed baseline against a dense reference. Skipped without torch.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fmm_attention import LearnedCoarsening
from fmm_attention import fmm_attention as np_fmm_attention

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "study" / "train_lm.py"


@pytest.fixture(scope="module")
def study():
    if not SCRIPT.is_file():
        pytest.skip("docs/ is not part of this installation")
    spec = importlib.util.spec_from_file_location("train_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(study, **over):
    cfg = dict(study.SMALL, d_model=8, n_heads=2, n_layers=1, seq_len=64, batch=2, steps=3, lr=3e-2, warmup=1,
               block_size=4, rank=2, eval_every=3, val_windows=2)
    cfg.update(over)
    return cfg


def test_corpus_split_is_by_file_and_deterministic(study):
    root, train, val = study.corpus_files()
    assert train and val and not set(train) & set(val)
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
    assert study.corpus_files()[1:] == (train, val)


@pytest.mark.parametrize("causal", [False, True])
def test_window_attention_is_the_fma_near_field(study, causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 19, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    m = 4
    i, j = np.arange(19)[:, None], np.arange(19)[None, :]
    allowed = np.abs(i // m - j // m) <= 1
    if causal:
        allowed &= (j <= i) & (i // m - j // m <= 1)
    s = (q @ k.transpose(-1, -2)) * 3**-0.5
    dense = torch.softmax(s.masked_fill(~torch.from_numpy(allowed), float("-inf")), -1) @ v
    got = study.window_attention(q, k, v, block_size=m, causal=causal)
    torch.testing.assert_close(got, dense)


@pytest.mark.parametrize(("task", "kind"), [("causal", "fma-learned"), ("masked", "fma-learned-cq")])
def test_trained_coarsening_reproduces_attention_in_numpy(study, tmp_path, task, kind):
    cfg = tiny(study)
    result, model = study.train_one(task, kind, 0, cfg, log=lambda s: None, return_model=True)
    assert np.isfinite(result["val_bits"])
    # the run accounts for its wall time: set-up, evaluations and steps inside the process's
    parts = [result[f"{part}_seconds"] for part in ("startup", "setup", "train", "eval")]
    assert min(parts) >= 0 and result["eval_seconds"] > 0 and result["step_cpu_seconds"] > 0
    assert sum(parts) <= result["process_seconds"] + 1e-6
    attn = model.blocks[0].attn
    start = study.fmt.FMMAttention(cfg["seq_len"], attn.dh, block_size=cfg["block_size"], rank=cfg["rank"],
                                   causal=task == "causal", dtype=torch.float32)
    # training moved the weights away from their sub-box-mean start (else the check is the mean's)
    assert any(not torch.equal(a, b) for a, b in zip(attn.fmm.parameters(), start.parameters()))

    # the study's checkpoint format: the model's state dict, Conv1d layouts unchanged
    torch.save(model.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt")
    prefix = "blocks.0.attn.fmm."
    groups = [[state[f"{prefix}{name}.{i}"].numpy() for i in range(len(attn.fmm.key_weights))]
              for name in ("key_weights", "value_weights", "key_bias", "value_bias")]
    coarsening = LearnedCoarsening(*groups)

    inputs = torch.randint(0, 256, (2, cfg["seq_len"]), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        x = model.tok(inputs) + model.positions(cfg["seq_len"])
        x = model.blocks[0].ln1(x)
        q, k, v = attn.split(attn.qkv(x))
        torch_out = attn.core(q, k, v)
    np_out = np_fmm_attention(q.numpy(), k.numpy(), v.numpy(), causal=task == "causal",
                              block_size=cfg["block_size"], rank=cfg["rank"], coarsening=coarsening,
                              query_coarsening=kind == "fma-learned-cq")
    assert np_out.dtype == np.float32
    np.testing.assert_allclose(torch_out.numpy(), np_out, rtol=1e-5, atol=1e-6)
    # and the mean coarsening would not have reproduced it
    mean = np_fmm_attention(q.numpy(), k.numpy(), v.numpy(), causal=task == "causal",
                            block_size=cfg["block_size"], rank=cfg["rank"],
                            query_coarsening=kind == "fma-learned-cq")
    assert not np.allclose(torch_out.numpy(), mean, rtol=1e-5, atol=1e-6)


def test_learned_coarse_queries_refuse_the_causal_task(study):
    with pytest.raises(ValueError, match="bidirectional"):
        study.CharModel("fma-learned-cq", tiny(study), causal=True)


def test_sinusoidal_positions_shift_by_one_linear_map(study):
    # what makes them learnable at n >= 1024: an offset of k positions is the same linear map
    # (a rotation per frequency) at every position, unlike a learned table's rows
    table = study.sinusoidal(64, 8).double().numpy()
    for k in (1, 5):
        a, b = table[:-k], table[k:]
        rot, *_ = np.linalg.lstsq(a, b, rcond=None)
        np.testing.assert_allclose(a @ rot, b, atol=1e-9)
    assert not np.allclose(table[0], table[1])


def test_rotary_scores_depend_on_the_offset_only(study):
    cos, sin = study.rotary_tables(40, 8)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    rq = study.rotate(q.expand(40, 8), cos, sin)
    rk = study.rotate(k.expand(40, 8), cos, sin)
    scores = rq @ rk.T  # the same q and k at every position: a score per (i, j)
    for offset in (0, 3, -7):
        torch.testing.assert_close(torch.diagonal(scores, offset), torch.full((40 - abs(offset),), float(scores.diagonal(offset)[0])))
    assert not torch.allclose(scores.diagonal(0)[0], scores.diagonal(3)[0])
    # a rotation: lengths kept
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(40))


def test_model_refuses_an_unknown_position_encoding(study):
    with pytest.raises(ValueError, match="position encoding"):
        study.CharModel("exact", tiny(study, pos="rotary"), causal=True)


def test_set_overrides_only_known_entries(study, tmp_path):
    with pytest.raises(SystemExit, match="--set"):
        study.main(["--out", str(tmp_path), "--set", "learning_rate=0.1"])


def write_corpus(path, train, val):
    """A corpus cache (the driver's ``corpus.npz``) holding the given byte strings."""
    np.savez(path, train=np.frombuffer(train, dtype=np.uint8), val=np.frombuffer(val, dtype=np.uint8),
             n_train_files=1, n_val_files=1)


def test_count_baselines_match_hand_counts(study, tmp_path):
    # train "aab": unigram counts a 2, b 1, c 0; pairs aa 1, ab 1; add-one smoothing over 257
    # symbols gives p(a) = 3/260, p(b) = 2/260, p(c) = 1/260, p(b|a) = 2/259 (row a: 2 + 2 +
    # 255), p(c|b) = p(a|c) = 1/257 (b and c are never followed by anything in train)
    write_corpus(tmp_path / "c.npz", b"aab", b"abc" * 4)
    cfg = tiny(study, seq_len=3, batch=2, val_windows=2, final_val_windows=2, corpus_cache=str(tmp_path / "c.npz"))
    # the windows (starts 0 and 7) read "abca" and "bcab": the pairs ab, bc, ca once each
    got = study.count_baselines(cfg, "causal")
    uni = -(np.log2(3 / 260) + np.log2(2 / 260) + np.log2(1 / 260)) / 3
    big = -(np.log2(2 / 259) + 2 * np.log2(1 / 257)) / 3
    for name in ("curve", "final"):
        np.testing.assert_allclose(got[name], (uni, big), rtol=1e-12)


def test_count_baselines_masked_task_scores_masked_characters_only(study, tmp_path):
    # every validation character is "a", so whichever are masked, unigram is -log2(3/260) and
    # no bigram is given (the previous character may itself be masked)
    write_corpus(tmp_path / "c.npz", b"aab", b"a" * 200)
    cfg = tiny(study, seq_len=64, batch=2, val_windows=2, final_val_windows=4, corpus_cache=str(tmp_path / "c.npz"))
    curve, final = study.validation_sets(np.frombuffer(b"a" * 200, dtype=np.uint8), cfg, "masked")
    assert all(int((y != -100).sum()) > 0 for _, y in curve + final)
    got = study.count_baselines(cfg, "masked")
    for name in ("curve", "final"):
        np.testing.assert_allclose(got[name][0], -np.log2(3 / 260), rtol=1e-12)
        assert np.isnan(got[name][1])


@pytest.mark.slow
def test_parallel_driver_runs_every_run_once(study, tmp_path):
    # two runs at once (--jobs 2) on a tiny model and corpus (the driver finds out/corpus.npz
    # and does not read the standard library); the window attention needs no compiled kernel
    rng = np.random.default_rng(0)
    write_corpus(tmp_path / "corpus.npz", bytes(rng.integers(97, 100, 4000, dtype=np.uint8)),
                 bytes(rng.integers(97, 100, 1000, dtype=np.uint8)))
    over = ["d_model=8", "n_heads=2", "n_layers=1", "seq_len=64", "batch=2", "warmup=1", "block_size=4",
            "rank=2", "eval_every=2", "val_windows=2", "final_val_windows=2"]
    study.main(["--out", str(tmp_path), "--jobs", "2", "--tasks", "causal", "--attentions", "window",
                "--steps", "2", "--seeds", "0", "1", "--set", *over])
    results = [json.loads((tmp_path / f"causal-window-{seed}.json").read_text()) for seed in (0, 1)]
    assert [r["seed"] for r in results] == [0, 1]
    assert all(r["jobs"] == 2 and r["config"]["d_model"] == 8 and np.isfinite(r["val_bits"]) for r in results)
    assert results[0]["val_bits"] != results[1]["val_bits"]  # the seeds were not the same run twice
    wall = json.loads((tmp_path / "wall.json").read_text())
    assert wall["jobs"] == 2 and wall["failed"] == []
    # a second call finds both results and reruns nothing
    before = [(tmp_path / f"causal-window-{seed}.json").stat().st_mtime_ns for seed in (0, 1)]
    study.main(["--out", str(tmp_path), "--jobs", "2", "--tasks", "causal", "--attentions", "window",
                "--steps", "2", "--seeds", "0", "1", "--set", *over])
    assert [(tmp_path / f"causal-window-{seed}.json").stat().st_mtime_ns for seed in (0, 1)] == before
