"""Training study: character-level language models with FMA against exact attention and peers.

A small pre-LayerNorm transformer (PyTorch embeddings, rotary position encoding, MLPs,
optimiser) whose attention goes through :mod:`fmm_attention.interop.torch`, trained on the source files of Python's standard
library (split into train and validation by file), on two tasks:

* ``causal``: next character, validation loss in bits per character;
* ``masked``: 15 % of the characters replaced by a mask symbol and predicted from both
  sides (bidirectional attention), bits per masked character.

Attentions, same model, steps and tokens: ``exact``; ``fma-mean``; ``fma-learned`` (trainable
grouped-convolution coarsening, the paper's); ``fma-learned-cq`` (learned coarsening with
coarse queries, O(n), masked task only: the library has no causal coarse queries);
``window`` (the FMA near field alone, implemented here with torch ops: the library has no
windowed attention); ``fastformer``.

One command runs the study (every task, attention and seed, each in its own process so its
peak memory is its own, ``--jobs`` of them at a time, by default one per CPU, after one
process has filled Numba's on-disk cache) and writes JSON results; ``--report`` turns them
into the docs' table and plot::

    python docs/study/train_lm.py --out /tmp/study-runs/small            # 25 min on 2 CPUs at load 2-11
    python docs/study/train_lm.py --out /tmp/study-runs/small --report docs/_static
    python docs/study/train_lm.py --full --out runs/full                 # bigger model and context

Needs torch (extra ``[torch]``) and matplotlib (for ``--report``).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pathlib
import subprocess
import sys
import sysconfig
import time
import zlib

import numba
import numpy as np
import torch

from fmm_attention.interop import torch as fmt

ATTENTIONS = ("exact", "fma-mean", "fma-learned", "fma-learned-cq", "window", "fastformer")
TASKS = ("causal", "masked")
MASK_ID = 256  # bytes 0..255 are the characters; one more symbol for masked positions
VOCAB = 257
MASK_RATE = 0.15

# The small defaults were chosen on the tuning split (``--set tune=True``: a tenth of the
# training files held out; the reported validation files were not looked at) with short
# runs of exact attention (docs/study/results_small/tuning.jsonl). Per character seen, one
# window per step learned faster than 2 or 4 (more optimiser steps; a step of one window
# costs about 1.2x a step of two per character), so 600 steps of one window take about the
# CPU time of the former 200 steps of four; rotary position encoding beat a learned table
# and sinusoids; embeddings at unit scale with an untied output layer beat GPT-2's 0.02
# tied ones, whose token signal the first block's outputs drown at the start.
SMALL = dict(d_model=64, n_layers=2, n_heads=2, seq_len=1024, batch=1, steps=600, lr=1e-2, warmup=20,
             block_size=32, rank=4, eval_every=50, val_windows=16,
             final_val_windows=64, seeds=(0, 1), pos="rope", tie=False, emb_std=1.0, pos_std=0.02,
             wd=0.01, beta2=0.95, lr_floor=0.0, mask_rate=MASK_RATE, tune=False)
FULL = dict(SMALL, d_model=256, n_layers=4, n_heads=4, seq_len=2048, batch=16, steps=5000, lr=1e-3, warmup=200,
            block_size=64, rank=4, eval_every=250, val_windows=128,
            final_val_windows=512, seeds=(0, 1, 2))


# ---------------------------------------------------------------- data
def corpus_files(root=None, *, tune=False):
    """The standard library's ``.py`` files (sorted relative paths), split by a hash of the path.

    About one file in ten goes to validation (``crc32(path) % 10 == 0``): whole files, so
    no validation window shares a file with the training data, and the split is the same on
    every machine with the same Python version. ``tune=True`` gives the tuning split instead:
    the training files less about one in ten of them, which take validation's place.
    """
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "__pycache__"} & set(p.parts)
    )
    val = [f for f in files if zlib.crc32(f.encode()) % 10 == 0]
    train = [f for f in files if zlib.crc32(f.encode()) % 10 != 0]
    if tune:
        # the tuning split: about a tenth of the *training* files stand in for validation,
        # so that choosing hyperparameters never looks at the reported validation files
        val = [f for f in train if zlib.crc32(f.encode()) % 10 == 1]
        train = [f for f in train if zlib.crc32(f.encode()) % 10 != 1]
    return root, train, val


def load_stream(root, files):
    """The files' bytes joined by newlines, as one uint8 array (bytes are the characters)."""
    return np.frombuffer(b"\n".join((root / f).read_bytes() for f in files), dtype=np.uint8)


def corpus_streams(cfg):
    """``(train, val, n_train_files, n_val_files)``: the split's two streams, from
    ``cfg["corpus_cache"]`` (an ``.npz`` the driver writes once, so parallel runs do not each
    walk the standard library) when given, else from the files.
    """
    cache = cfg.get("corpus_cache")
    if cache and pathlib.Path(cache).is_file():
        with np.load(cache) as z:
            return z["train"], z["val"], int(z["n_train_files"]), int(z["n_val_files"])
    root, train_files, val_files = corpus_files(cfg.get("stdlib"), tune=bool(cfg.get("tune")))
    return load_stream(root, train_files), load_stream(root, val_files), len(train_files), len(val_files)


def validation_sets(val_stream, cfg, task):
    """``(curve, final)``: batches of ``val_windows`` and of ``final_val_windows`` windows
    evenly spaced through the validation stream, with the same masks for every attention and
    seed: the first for the loss curve, the larger for the reported loss at the end.
    """
    n, b = cfg["seq_len"], 4  # 4 windows per forward call, whatever the training batch
    sets = []
    for count in (cfg["val_windows"], cfg["final_val_windows"]):
        gen = torch.Generator().manual_seed(12345)
        starts = np.linspace(0, len(val_stream) - n - 2, count).astype(np.int64)
        sets.append([make_batch(val_stream, starts[i : i + b], n, task, gen, cfg.get("mask_rate", MASK_RATE)) for i in range(0, len(starts), b)])
    return tuple(sets)


def masked_inputs(tokens, gen, rate=MASK_RATE):
    """``(inputs, targets)``: targets keep the masked characters only (``-100`` elsewhere)."""
    masked = torch.rand(tokens.shape, generator=gen) < rate
    inputs = torch.where(masked, torch.full_like(tokens, MASK_ID), tokens)
    targets = torch.where(masked, tokens, torch.full_like(tokens, -100))
    return inputs, targets


def make_batch(stream, offsets, seq_len, task, gen, mask_rate=MASK_RATE):
    """Windows of the stream starting at ``offsets``: causal, shifted by one; masked, masked."""
    idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    tokens = torch.from_numpy(stream[idx].astype(np.int64))
    if task == "causal":
        return tokens[:, :-1], tokens[:, 1:]
    return masked_inputs(tokens[:, :-1], gen, mask_rate)


# ---------------------------------------------------------------- timing of the attention
class _Timer:
    """Wall time spent inside attention, forward and backward (reset per step)."""

    def __init__(self):
        self.seconds = 0.0
        self._back_start = None


TIMER = _Timer()


class _BackwardEnd(torch.autograd.Function):
    """Identity on the projected q, k, v: its backward runs after the attention's."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if TIMER._back_start is not None:
            TIMER.seconds += time.perf_counter() - TIMER._back_start
            TIMER._back_start = None
        return g


class _BackwardStart(torch.autograd.Function):
    """Identity on the attention's output: its backward runs just before the attention's."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        TIMER._back_start = time.perf_counter()
        return g


# ---------------------------------------------------------------- attentions
def window_attention(q, k, v, *, block_size, causal):
    """FMA's near field alone (blocks ``I-1, I, I+1``; causal: ``I-1`` and keys ``j <= i``
    of ``I``), with torch ops: the local baseline at the same near field as FMA.
    """
    *lead, n, d = q.shape
    m = block_size
    nb = -(-n // m)
    pad = nb * m - n

    def blocks(x):
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(*lead, nb, m, x.shape[-1])

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    zeros = (0, 0, 0, 0, 1, 1)  # one empty block on each side of the block axis
    kp, vp = torch.nn.functional.pad(kb, zeros), torch.nn.functional.pad(vb, zeros)
    kn = torch.cat([kp[..., 0:nb, :, :], kp[..., 1 : nb + 1, :, :], kp[..., 2 : nb + 2, :, :]], dim=-2)
    vn = torch.cat([vp[..., 0:nb, :, :], vp[..., 1 : nb + 1, :, :], vp[..., 2 : nb + 2, :, :]], dim=-2)
    scores = (qb @ kn.transpose(-1, -2)) * d**-0.5  # (..., nb, m, 3m)
    block = torch.arange(nb)[:, None, None]
    i = block * m + torch.arange(m)[None, :, None]
    j = (block - 1) * m + torch.arange(3 * m)[None, None, :]
    allowed = (j >= 0) & (j < n)
    if causal:
        allowed = allowed & (j <= i)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vn
    return out.reshape(*lead, nb * m, v.shape[-1])[..., :n, :]


class Attention(torch.nn.Module):
    """Multi-head self-attention whose core is one of :data:`ATTENTIONS`."""

    def __init__(self, kind, cfg, causal):
        super().__init__()
        c, h = cfg["d_model"], cfg["n_heads"]
        self.kind, self.causal, self.h, self.dh = kind, causal, h, c // h
        self.m, self.p = cfg["block_size"], cfg["rank"]
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.proj = torch.nn.Linear(c, c)
        if kind in ("fma-learned", "fma-learned-cq"):
            if kind == "fma-learned-cq" and causal:
                raise ValueError("fma-learned-cq is bidirectional only (coarse queries mix in future tokens)")
            self.fmm = fmt.FMMAttention(cfg["seq_len"], self.dh, block_size=self.m, rank=self.p, causal=causal,
                                        query_coarsening=kind == "fma-learned-cq", dtype=torch.float32)
        if kind == "fastformer":
            self.w_q = torch.nn.Parameter(torch.randn(h, self.dh) * self.dh**-0.5)
            self.w_k = torch.nn.Parameter(torch.randn(h, self.dh) * self.dh**-0.5)
        self.last_qkv = None  # the most recent q, k, v (for checking against the NumPy API)
        self.rope = cfg["pos"] == "rope"
        if self.rope:
            cos, sin = rotary_tables(cfg["seq_len"], self.dh)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def core(self, q, k, v):
        """The attention of ``q``, ``k``, ``v`` (``(batch, heads, n, d_head)``)."""
        if self.kind == "exact":
            return fmt.exact_attention(q, k, v, causal=self.causal)
        if self.kind == "fma-mean":
            return fmt.fmm_attention(q, k, v, causal=self.causal, block_size=self.m, rank=self.p)
        if self.kind in ("fma-learned", "fma-learned-cq"):
            return self.fmm(q, k, v)
        if self.kind == "window":
            return window_attention(q, k, v, block_size=self.m, causal=self.causal)
        if self.kind == "fastformer":
            return fmt.fastformer_attention(q, k, v, self.w_q, self.w_k, causal=self.causal)
        raise ValueError(f"unknown attention {self.kind!r}; expected one of {ATTENTIONS}")

    def split(self, qkv):
        """``q, k, v`` (``(batch, heads, n, d_head)``, contiguous) from the projection ``self.qkv(x)``
        (``(batch, n, 3 d_model)``): the core's inputs, rotary encoding applied to ``q`` and ``k``.
        """
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = rotate(q, self.rope_cos[:n], self.rope_sin[:n]), rotate(k, self.rope_cos[:n], self.rope_sin[:n])
        return q.contiguous(), k.contiguous(), v.contiguous()

    def forward(self, x):
        """Project ``x`` (``(batch, n, d_model)``), attend per head, project back."""
        b, n, c = x.shape
        qkv = _BackwardEnd.apply(self.qkv(x))
        t0 = time.perf_counter()
        q, k, v = self.split(qkv)
        self.last_qkv = (q.detach(), k.detach(), v.detach())
        out = self.core(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, c)
        TIMER.seconds += time.perf_counter() - t0
        return self.proj(_BackwardStart.apply(out))


class Block(torch.nn.Module):
    """Pre-LayerNorm transformer block: attention, then a 4x GELU MLP, each residual."""

    def __init__(self, kind, cfg, causal):
        super().__init__()
        c = cfg["d_model"]
        self.ln1, self.ln2 = torch.nn.LayerNorm(c), torch.nn.LayerNorm(c)
        self.attn = Attention(kind, cfg, causal)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(c, 4 * c), torch.nn.GELU(), torch.nn.Linear(4 * c, c))

    def forward(self, x):
        """The block applied to ``x`` (``(batch, n, d_model)``)."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def rotary_tables(n, d):
    """``cos, sin`` ``(n, d // 2)`` (float32) of rotary position encoding (Su et al., RoFormer)."""
    angle = torch.arange(n, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    return torch.cos(angle).float(), torch.sin(angle).float()


def rotate(x, cos, sin):
    """Rotary position encoding of ``x`` (``(..., n, d)``): pairs ``(x_i, x_{i + d/2})`` turned by
    the position's angles, so that ``q_i . k_j`` depends on the positions through ``i - j`` only.
    """
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def sinusoidal(n, c, std=0.02):
    """Sinusoidal position encodings ``(n, c)`` (float32), scaled to a root mean square ``std``."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, c, 2, dtype=torch.float64) / c)
    table = torch.zeros(n, c, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return (table * std * 2**0.5).float()


class CharModel(torch.nn.Module):
    """Character embeddings (plus absolute positions, unless rotary), pre-LN blocks, a final
    LayerNorm and an output layer (tied to the embeddings when ``cfg["tie"]``).
    """

    def __init__(self, kind, cfg, causal):
        super().__init__()
        c = cfg["d_model"]
        self.tok = torch.nn.Embedding(VOCAB, c)
        self.pos_kind = cfg["pos"]
        if self.pos_kind == "learned":
            self.pos = torch.nn.Embedding(cfg["seq_len"], c)
            torch.nn.init.normal_(self.pos.weight, std=cfg.get("pos_std", 0.02))
        elif self.pos_kind == "sinusoidal":
            # fixed (Vaswani et al.): a position offset is a rotation of these features, so
            # attending to a neighbour is one learned map for every position, where a learned
            # table must learn each of the seq_len positions separately
            self.register_buffer("pos_table", sinusoidal(cfg["seq_len"], c, cfg.get("pos_std", 0.02)), persistent=False)
        elif self.pos_kind != "rope":  # rotary: applied to q and k inside each attention
            raise ValueError(f"unknown position encoding {self.pos_kind!r}; expected 'sinusoidal', 'learned' or 'rope'")
        self.blocks = torch.nn.ModuleList(Block(kind, cfg, causal) for _ in range(cfg["n_layers"]))
        self.ln = torch.nn.LayerNorm(c)
        # unit scale (the default): the token signal is not drowned by the first block's
        # outputs at the start; a tied output layer then needs GPT-2's 0.02 instead, or its
        # starting logits are large. An untied one starts at 0.02: near uniform logits.
        torch.nn.init.normal_(self.tok.weight, std=cfg.get("emb_std", 0.02))
        self.head = None if cfg.get("tie", True) else torch.nn.Linear(c, VOCAB, bias=False)
        if self.head is not None:
            torch.nn.init.normal_(self.head.weight, std=0.02)

    def positions(self, n):
        """The position encodings of the first ``n`` positions, ``(n, d_model)``."""
        if self.pos_kind == "learned":
            return self.pos(torch.arange(n))
        if self.pos_kind == "rope":
            return torch.zeros(n, self.tok.embedding_dim)
        return self.pos_table[:n]

    def forward(self, idx):
        """Logits ``(batch, n, VOCAB)`` for the symbols ``idx`` (``(batch, n)``)."""
        x = self.tok(idx) + self.positions(idx.shape[1])
        for blk in self.blocks:
            x = blk(x)
        x = self.ln(x)
        return x @ self.tok.weight.T if self.head is None else self.head(x)


# ---------------------------------------------------------------- one run
def rss_mib(field):
    """``VmRSS`` or ``VmHWM`` (peak) of this process, MiB (Linux ``/proc``; NaN elsewhere)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss():
    """Restart the peak (``VmHWM``) at the current RSS (Linux >= 4.0; ignored elsewhere)."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def bits(loss_nats):
    """Nats to bits."""
    return loss_nats / math.log(2)


def evaluate(model, val_batches):
    """Validation loss in bits per predicted character (every target that is not -100)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in val_batches:
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((targets != -100).sum())
    model.train()
    return bits(total / count)


def train_one(task, kind, seed, cfg, *, log=print, return_model=False):
    """Train one model; returns the result dict (and the model when ``return_model``)."""
    causal = task == "causal"
    t_start = time.time()
    launched = float(os.environ.get("STUDY_LAUNCHED_AT", t_start))  # set by the driver
    load_start = load_average()
    torch.manual_seed(seed)
    train_stream, val_stream, n_train_files, n_val_files = corpus_streams(cfg)
    n, b = cfg["seq_len"], cfg["batch"]
    val_batches, final_batches = validation_sets(val_stream, cfg, task)

    model = CharModel(kind, cfg, causal)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg.get("wd", 0.01),
                            betas=(0.9, cfg.get("beta2", 0.95)))
    steps, warmup, floor = cfg["steps"], cfg["warmup"], cfg.get("lr_floor", 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    curve, step_times, attn_times, cpu_times, train_bits = [], [], [], [], []
    setup_seconds = time.time() - t_start
    t_eval = time.perf_counter()
    curve.append((0, float("nan"), evaluate(model, val_batches)))
    eval_seconds = time.perf_counter() - t_eval
    base_rss = rss_mib("VmRSS")
    for step in range(steps):
        if step == 1:  # the first step loads compiled kernels; the peak is measured after it
            reset_peak_rss()
        inputs, targets = make_batch(train_stream, rng.integers(0, len(train_stream) - n - 2, b), n, task, gen,
                                     cfg.get("mask_rate", MASK_RATE))
        TIMER.seconds, TIMER._back_start = 0.0, None
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step_times.append(time.perf_counter() - t0)
        train_bits.append(bits(loss.item()))
        cpu_times.append(time.process_time() - c0)
        attn_times.append(TIMER.seconds)
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            t_eval = time.perf_counter()
            val = evaluate(model, val_batches)
            eval_seconds += time.perf_counter() - t_eval
            curve.append((step + 1, bits(loss.item()), val))
            log(f"{task} {kind} seed {seed} step {step + 1}: train {bits(loss.item()):.3f} val {val:.3f} bits/char, "
                f"{np.median(step_times[1:] or step_times):.3f} s/step")
    t_eval = time.perf_counter()
    final_bits = evaluate(model, final_batches)
    eval_seconds += time.perf_counter() - t_eval
    timed = slice(1, None) if steps > 1 else slice(None)  # the first step loads compiled kernels
    result = dict(
        task=task, attention=kind, seed=seed, config={k: v for k, v in cfg.items() if k not in ("seeds", "corpus_cache")},
        val_bits=final_bits, curve=curve,
        # the training batches' loss over the last tenth of the steps (text the model saw once)
        train_bits=float(np.mean(train_bits[-max(1, steps // 10):])),
        step_seconds=float(np.median(step_times[timed])),
        # CPU seconds of the process per step: on a shared machine the wall time per step
        # grows with the load, the CPU time much less (one thread per run)
        step_cpu_seconds=float(np.median(cpu_times[timed])),
        attention_share=float(np.sum(attn_times[timed]) / np.sum(step_times[timed])),
        base_rss_mib=base_rss, peak_rss_mib=rss_mib("VmHWM"),
        torch_threads=torch.get_num_threads(), numba_threads=numba.get_num_threads(), n_train_chars=len(train_stream), n_val_chars=len(val_stream),
        n_train_files=n_train_files, n_val_files=n_val_files, python=sys.version.split()[0],
        parameters=sum(p.numel() for p in model.parameters()),
        # where a run's wall time goes: interpreter and imports, data and model set-up, the
        # steps (the first loads the cached kernels, or compiles them), the evaluations, and
        # the whole process; jobs: how many runs the driver ran in parallel
        startup_seconds=t_start - launched, setup_seconds=setup_seconds, first_step_seconds=step_times[0],
        eval_seconds=eval_seconds, train_seconds=float(np.sum(step_times)), process_seconds=time.time() - launched,
        jobs=int(os.environ.get("STUDY_JOBS", 1)), cpus=os.cpu_count(), loadavg_start=load_start, loadavg_end=load_average(),
    )
    return (result, model) if return_model else result


def runs(cfg, tasks, attentions):
    """Seed by seed, so that a study cut short still has every attention once."""
    for seed in cfg["seeds"]:
        for task in tasks:
            for kind in attentions:
                if kind == "fma-learned-cq" and task == "causal":
                    continue
                yield task, kind, seed


# ---------------------------------------------------------------- report
def count_baselines(cfg, task):
    """Bits per predicted character of the train split's unigram and bigram counts (add-one
    smoothed) on the study's validation targets: ``{"curve": (unigram, bigram), "final": ...}``
    for the curve's and the final evaluation's windows (bigram ``nan`` for the masked task,
    whose previous character may itself be masked).

    What a model that ignores context (unigram) or sees one previous character (bigram)
    reaches on the same characters as the models: the floor a trained model has to beat to
    show it uses context.
    """
    train, val, *_ = corpus_streams(cfg)
    train = train.astype(np.int64)
    uni = np.bincount(train, minlength=VOCAB) + 1.0
    big = np.bincount(train[:-1] * VOCAB + train[1:], minlength=VOCAB * VOCAB).reshape(VOCAB, VOCAB) + 1.0
    out = {}
    for name, batches in zip(("curve", "final"), validation_sets(val, cfg, task)):
        inputs = torch.cat([x for x, _ in batches]).numpy()
        targets = torch.cat([y for _, y in batches]).numpy()
        keep = targets != -100
        y = targets[keep]
        uni_bits = -np.mean(np.log2(uni[y] / uni.sum()))
        big_bits = float("nan")
        if task == "causal":  # the input at a position is the target's previous character
            x = inputs[keep]
            big_bits = -np.mean(np.log2(big[x, y] / big.sum(axis=1)[x]))
        out[name] = (float(uni_bits), float(big_bits))
    return out


def report(out, static):
    """``training_study_table.inc`` (a list-table, included by the page) and ``training_study_curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in sorted(pathlib.Path(out).glob("*-*-*.json"))]
    results = [r for r in results if "task" in r]
    results.sort(key=lambda r: r["seed"])
    static = pathlib.Path(static)
    rows = [".. list-table::", "   :header-rows: 1", "",
            "   * - task", "     - attention", "     - validation bits/char (mean ± spread)",
            "     - training batches' bits/char, last 10 % of steps (per seed)",
            "     - s/step, wall (per seed)", "     - s/step, CPU (per seed)", "     - attention share (per seed)",
            "     - peak RSS over start, MiB (per seed)"]
    cfg = dict(results[0]["config"], corpus_cache=str(pathlib.Path(out) / "corpus.npz"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, task in zip(axes, TASKS):
        if not any(r["task"] == task for r in results):
            continue
        baselines = count_baselines(cfg, task)
        for name, value in zip(("unigram counts", "bigram counts"), baselines["final"]):
            if np.isfinite(value):
                rows += [f"   * - {task}", f"     - *{name}*", f"     - {value:.3f} (no training)",
                         "     -", "     -", "     -", "     -", "     -"]
        uni_bits, big_bits = baselines["curve"]
        ax.axhline(uni_bits, color="gray", ls=":", lw=1, label=f"unigram counts ({uni_bits:.2f})")
        if task == "causal":
            ax.axhline(big_bits, color="gray", ls="--", lw=1, label=f"bigram counts ({big_bits:.2f})")
        for kind in ATTENTIONS:
            rs = [r for r in results if r["task"] == task and r["attention"] == kind]
            if not rs:
                continue
            vals = np.array([r["val_bits"] for r in rs])
            spread = (vals.max() - vals.min()) / 2
            extra = np.array([r["peak_rss_mib"] - r["base_rss_mib"] for r in rs])
            rows += [f"   * - {task}", f"     - {kind}", f"     - {vals.mean():.3f} ± {spread:.3f} ({len(rs)} seed{'s' if len(rs) > 1 else ''})",
                     "     - " + " / ".join(f"{r['train_bits']:.2f}" for r in rs),
                     "     - " + " / ".join(f"{r['step_seconds']:.2f}" for r in rs),
                     "     - " + " / ".join(f"{r['step_cpu_seconds']:.2f}" for r in rs),
                     "     - " + " / ".join(f"{100 * r['attention_share']:.0f} %" for r in rs),
                     "     - " + " / ".join(f"{x:.0f}" for x in extra)]
            steps = np.array([c[0] for c in rs[0]["curve"]])
            curves = np.array([[c[2] for c in r["curve"]] for r in rs])
            ax.plot(steps, curves.mean(0), label=kind)
            ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2)
        ax.set_title({"causal": "autoregressive (next char)", "masked": "bidirectional (masked chars)"}[task])
        ax.set_ylim(top=uni_bits + 0.8)  # the first evaluations (8 bits at step 0) would flatten the rest
        ax.set_xlabel("step")
        ax.set_ylabel("validation bits per char")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(static / "training_study_curves.png", dpi=80)
    jobs = sorted({r.get("jobs", 1) for r in results})
    rows += ["", f"Validation bits per predicted character on {cfg['final_val_windows']} windows of "
             f"{cfg['seq_len']} characters evenly spaced through the validation files, after "
             f"{cfg['steps']} steps; the plot's curves (and its reference lines) use the first "
             f"evaluation set of {cfg['val_windows']} windows. \"±\" is half the range over the seeds.", "",
             f"Time per step is the median over steps 2 to the last of one run, measured with "
             f"{' or '.join(map(str, jobs))} run{'s' if jobs != [1] else ''} of the study in parallel on a shared "
             f"{results[0].get('cpus', os.cpu_count())}-CPU machine (one thread each): wall seconds grow with the machine's load, "
             "CPU seconds of the run's process much less."]
    wall = pathlib.Path(out) / "wall.json"
    if wall.is_file():
        w = json.loads(wall.read_text())
        rows += ["", f"The whole study took {w['wall_seconds'] / 60:.1f} minutes of wall time ({w['jobs']} runs in "
                 f"parallel; {w['warm_seconds']:.0f} s of it the warm-up that loads, or compiles when not cached, every "
                 f"kernel once before the runs) at a "
                 f"1-minute load average of {w['loadavg_1min_min']:.1f} to {w['loadavg_1min_max']:.1f} "
                 f"(mean {w['loadavg_1min_mean']:.1f}, sampled every 30 s) on {w['cpus']} CPUs."]
    rows += ["", "The *unigram* and *bigram* rows are the train split's character and character-pair counts "
             "(add-one smoothed) scored on the same validation characters: what a model reaches that ignores "
             "the context or sees only the previous character."]
    (static / "training_study_table.inc").write_text("\n".join(rows) + "\n")
    print(f"wrote {static / 'training_study_table.inc'} and {static / 'training_study_curves.png'}")


# ---------------------------------------------------------------- command line
def load_average():
    """The 1-, 5- and 15-minute load averages (NaN where the platform has none)."""
    return tuple(os.getloadavg()) if hasattr(os, "getloadavg") else (float("nan"),) * 3


def warm_cache(cfg, plan, out):
    """One training step of every (task, attention) in ``plan`` on random symbols, so that
    Numba compiles each kernel once and writes it to its on-disk cache; the seconds per
    pair (mostly compiling, or loading when already cached) go to ``out/warm.json``.
    """
    seconds = {}
    for task, kind in dict.fromkeys((t, k) for t, k, _ in plan):
        t0 = time.perf_counter()
        model = CharModel(kind, cfg, task == "causal")
        idx = torch.randint(0, 256, (1, cfg["seq_len"]))
        loss = model(idx).logsumexp(-1).mean()
        loss.backward()
        with torch.no_grad():  # evaluation's path (the adapter may skip saving for backward)
            model(idx)
        seconds[f"{task}-{kind}"] = time.perf_counter() - t0
        print(f"warm-up {task} {kind}: {seconds[f'{task}-{kind}']:.1f} s", flush=True)
    (out / "warm.json").write_text(json.dumps(seconds, indent=1) + "\n")


def main(argv=None):
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for one JSON file per run")
    ap.add_argument("--full", action="store_true", help="the full size (GPU-class time; see FULL)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    ap.add_argument("--steps", type=int, help="override the number of steps")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and Numba threads per run (1: on a shared, loaded machine one thread per "
                         "run was 4-6x faster per step than two, measured at load average 13 on 2 cores)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override configuration entries (e.g. lr=0.01 pos=learned); values are Python literals")
    ap.add_argument("--report", metavar="STATIC", help="write the table and plot from --out's results there")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="runs in parallel, one process each (default: the number of CPUs)")
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", nargs=3, metavar=("TASK", "ATTENTION", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.report:
        return report(out, args.report)
    cfg = dict(FULL if args.full else SMALL)
    if args.steps:
        cfg["steps"] = args.steps
        cfg["eval_every"] = min(cfg["eval_every"], args.steps)
    if args.seeds:
        cfg["seeds"] = tuple(args.seeds)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in cfg:
            raise SystemExit(f"--set: expected KEY=VALUE with KEY one of {sorted(cfg)}, got {item!r}")
        try:
            cfg[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            cfg[key] = value  # a bare word (pos=learned)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "corpus.npz").is_file():
        cfg["corpus_cache"] = str(out / "corpus.npz")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    if args.one:  # one run, in this process (the driver below starts one process per run)
        task, kind, seed = args.one
        result = train_one(task, kind, int(seed), cfg, log=lambda s: print(s, flush=True))
        (out / f"{task}-{kind}-{seed}.json").write_text(json.dumps(result, indent=1))
        return
    plan = [r for r in runs(cfg, args.tasks, args.attentions)]
    jobs = max(1, args.jobs)
    base = [sys.executable, __file__, "--out", str(out), "--threads", str(args.threads)]
    base += ["--full"] if args.full else []
    if args.steps:
        base += ["--steps", str(args.steps)]
    if args.seeds:
        base += ["--seeds", *map(str, args.seeds)]
    if args.set:
        base += ["--set", *args.set]
    if args.warm:  # compile every kernel the plan needs once, into Numba's on-disk cache
        return warm_cache(cfg, plan, out)
    t0 = time.time()
    loads = [(0.0, *load_average())]
    todo = []
    for task, kind, seed in plan:
        if (out / f"{task}-{kind}-{seed}.json").exists():
            print(f"{task} {kind} seed {seed}: done before, kept", flush=True)
        else:
            todo.append((task, kind, seed))
    if todo and "corpus_cache" not in cfg:
        train, val, n_train_files, n_val_files = corpus_streams(cfg)
        # written under a temporary name, so that a run never reads half a file
        np.savez(out / "corpus.tmp.npz", train=train, val=val, n_train_files=n_train_files, n_val_files=n_val_files)
        os.replace(out / "corpus.tmp.npz", out / "corpus.npz")
    warm_seconds = 0.0
    if todo and jobs > 1:
        # parallel runs would each compile the same kernels at once; one process compiles
        # them first and the runs load them from the cache (their first_step_seconds say so)
        subprocess.run(base + ["--warm", "--tasks", *args.tasks, "--attentions", *args.attentions], check=True)
        warm_seconds = time.time() - t0
    running, failed = {}, []
    while todo or running:
        while todo and len(running) < jobs:
            task, kind, seed = todo.pop(0)
            env = dict(os.environ, STUDY_LAUNCHED_AT=repr(time.time()), STUDY_JOBS=str(jobs))
            running[(task, kind, seed)] = subprocess.Popen(base + ["--one", task, kind, str(seed)], env=env)
        time.sleep(2)
        if time.time() - t0 - loads[-1][0] >= 30:
            loads.append((time.time() - t0, *load_average()))
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                if proc.returncode:
                    failed.append(key)
                    print(f"{' '.join(map(str, key))}: failed (exit {proc.returncode})", flush=True)
    loads.append((time.time() - t0, *load_average()))
    one_min = np.array([x[1] for x in loads])
    summary = dict(wall_seconds=time.time() - t0, warm_seconds=warm_seconds, jobs=jobs, threads=args.threads,
                   cpus=os.cpu_count(), loadavg_start=loads[0][1:], loadavg_end=loads[-1][1:],
                   loadavg_1min_mean=float(one_min.mean()), loadavg_1min_min=float(one_min.min()),
                   loadavg_1min_max=float(one_min.max()), loadavg_samples=loads, failed=failed,
                   command=" ".join(sys.argv))
    (out / "wall.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"study done in {summary['wall_seconds'] / 60:.1f} min ({jobs} runs in parallel, compile warm-up "
          f"{warm_seconds:.0f} s; 1-minute load average {one_min.min():.1f} to {one_min.max():.1f}, "
          f"mean {one_min.mean():.1f}, on {os.cpu_count()} CPUs)", flush=True)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {failed}")

if __name__ == "__main__":
    main()
