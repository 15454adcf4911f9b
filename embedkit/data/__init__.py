"""Data stage: readers and validators for retrieval (BEIR), STS and training-tuple files, plus the embedded
STS-B default. Every reader raises `embedkit.errors.DataError` naming file, line and field on bad input.
(No torch here: importing embedkit.data must stay cheap.)
"""

from embedkit.data.beir import BeirDataset, available_splits, is_beir_folder, load_beir, mteb_document_text
from embedkit.data.check import check_path, format_summary
from embedkit.data.defaults import load_stsb, stsb_file, stsb_paraphrase_retrieval
from embedkit.data.sts import StsDataset, load_sts
from embedkit.data.tuples import TrainingExample, pairs_from_beir, read_examples

__all__ = [
    "BeirDataset",
    "StsDataset",
    "TrainingExample",
    "available_splits",
    "check_path",
    "format_summary",
    "is_beir_folder",
    "load_beir",
    "load_sts",
    "load_stsb",
    "mteb_document_text",
    "pairs_from_beir",
    "read_examples",
    "stsb_file",
    "stsb_paraphrase_retrieval",
]
