"""Shared fixtures: tiny random BERT/RoBERTa classifiers (no download) and the shared GLUE folder."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GLUE_DIR = os.environ.get("GLUE_DIR") or os.path.join(ROOT, "..", "shared", "data", "glue")


def tiny_model(kind: str = "bert", seed: int = 0):
    from transformers import (BertConfig, BertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)
    torch.manual_seed(seed)
    common = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=24, max_position_embeddings=40, num_labels=2,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(**common)).eval()
    return RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **common)).eval()


def tiny_batch(seed: int = 0, n: int = 4, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (n,), generator=g)}


@pytest.fixture
def glue_dir():
    if not os.path.isdir(GLUE_DIR):
        pytest.skip(f"no GLUE folder at {GLUE_DIR}: set GLUE_DIR")
    return GLUE_DIR
