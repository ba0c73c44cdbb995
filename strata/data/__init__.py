"""The data layer: text sources -> documents -> train/validation split -> tokens -> batches.

    documents = load_documents(["shakespeare", "notes/", "extra.jsonl"])  # names: strata data list
    train, valid = split_documents(documents, 0.05)
    tokenizer = build_tokenizer(config.data, train)
    loader = TokenLoader(pack(train, tokenizer), seq_len, batch_size, seed)

Every problem with the input is raised as a one-line DataError before training starts.
"""

from strata.data.catalog import catalog_rows, data_path, known_names, resolve
from strata.data.documents import Document, load_documents, split_documents
from strata.data.errors import DataError
from strata.data.levels import model_inputs, model_levels
from strata.data.loader import Batch, StreamLoader, TokenLoader, document_ids, pack
from strata.data.registry import DATA_SETS, corpus_path, dataset_path
from strata.data.tasks import TASKS, UDHR_SAMPLE, build_task, task_path
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
    "DATA_SETS",
    "TASKS",
    "UDHR_SAMPLE",
    "BPETokenizer",
    "Batch",
    "ByteTokenizer",
    "DataError",
    "Document",
    "HFTokenizer",
    "StreamLoader",
    "TokenLoader",
    "Tokenizer",
    "build_task",
    "build_tokenizer",
    "catalog_rows",
    "check_vocab_size",
    "corpus_path",
    "data_path",
    "dataset_path",
    "known_names",
    "load_documents",
    "load_hf_tokenizer",
    "load_tokenizer",
    "model_inputs",
    "model_levels",
    "pack",
    "document_ids",
    "planned_vocab_size",
    "resolve",
    "split_documents",
    "task_path",
]
