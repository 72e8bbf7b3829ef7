"""Data for crma: user files, the embedded five-domain corpus, cleaning and QA items.

The training engine needs only what is exported here; `crma.data.clean` (the dataset
optimizer) and `crma.data.qa` (probes, MMLU) hold the rest.
"""

from crma.data.corpus import DOMAINS, corpus_file, ensure_corpus
from crma.data.formats import load_records, tokenize_records

__all__ = ["DOMAINS", "corpus_file", "ensure_corpus", "load_records", "tokenize_records"]
