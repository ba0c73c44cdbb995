"""The data layer: text sources -> documents -> train/validation split -> tokens -> batches.

    documents = load_documents(["shakespeare", "notes/", "extra.jsonl"])
    train, valid = split_documents(documents, 0.05)
    tokenizer = build_tokenizer(config.data, train)
    loader = TokenLoader(pack(train, tokenizer), seq_len, batch_size, seed)

Every problem with the input is raised as a one-line DataError before training starts.
"""

from strata.data.corpora import CORPORA, corpus_path, fetch_corpus
from strata.data.documents import Document, load_documents, split_documents
from strata.data.errors import DataError
from strata.data.levels import model_inputs, model_levels
from strata.data.loader import Batch, TokenLoader, pack
from strata.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    check_vocab_size,
    load_hf_tokenizer,
    load_tokenizer,
    planned_vocab_size,
)

__all__ = [
    "CORPORA",
    "BPETokenizer",
    "Batch",
    "ByteTokenizer",
    "DataError",
    "Document",
    "HFTokenizer",
    "TokenLoader",
    "Tokenizer",
    "build_tokenizer",
    "check_vocab_size",
    "corpus_path",
    "fetch_corpus",
    "load_documents",
    "load_hf_tokenizer",
    "load_tokenizer",
    "model_inputs",
    "model_levels",
    "pack",
    "planned_vocab_size",
    "split_documents",
]
