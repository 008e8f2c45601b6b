"""Shared test helpers: tiny random BERT/RoBERTa/MPNet classifiers and synthetic batches (no
download, no data files)."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import synthetic  # noqa: E402  (after the path insert)


# all-mpnet-base-v2's config.json, where it differs from a default MPNetConfig or matters for the
# shapes
MPNET_BASE = dict(vocab_size=30527, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, max_position_embeddings=514,
                  relative_attention_num_buckets=32, pad_token_id=1, layer_norm_eps=1e-5)


def tiny_model(kind: str = "bert", seed: int = 0):
    """A tiny random classifier: kind bert, roberta or mpnet (MPNet's module names:
    attention.attn.{q,k,v,o})."""
    from transformers import (BertConfig, BertForSequenceClassification, MPNetConfig,
                              MPNetForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)
    torch.manual_seed(seed)
    common = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=24, max_position_embeddings=40, num_labels=2,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(**common)).eval()
    if kind == "mpnet":
        # 128 tokens (train.py's default) after the pad id, as 514 -> 512
        common["max_position_embeddings"] = 130
        return MPNetForSequenceClassification(MPNetConfig(pad_token_id=1, **common)).eval()
    return RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **common)).eval()


def lora_model(kind: str = "bert", r: int = 2, alpha: float = 4.0, b_std: float = 0.0):
    """A tiny model with LoRA on its 12 target matrices, the base frozen: (model, [layers]).
    b_std > 0 draws B from N(0, b_std²) instead of LoRA's zeros, so that ΔW ≠ 0."""
    from lora import LoRALinear, freeze_base, inject
    model = tiny_model(kind)
    layers = list(inject(model, lambda lin: LoRALinear(lin, r, alpha)).values())
    freeze_base(model)
    if b_std:
        for l in layers:
            torch.nn.init.normal_(l.lora_B, std=b_std)
    return model, layers


def tiny(out_dir, **kw):
    """A config.Config on tiny-bert (hidden 32, FFN 64, 2 layers: 896 adapter parameters per unit of
    rank), 16 steps on toy_data()."""
    from train import Config
    base = dict(model="tiny-bert", task="sst2", epochs=2, lr=2e-3, budget=0.5,
                out_dir=str(out_dir), log_every=4,
                fw_warmup_max_frac=0.5,  # let the Fisher warm-up last a few of the 16 steps
                # the same on every CPU (auto is bf16 on AMX/AVX512-BF16, 1.33x slower at this size)
                precision="fp32")
    return Config(**(base | kw))


def tiny_batch(seed: int = 0, n: int = 4, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row
    labels = torch.randint(0, 2, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def toy_data(n_train: int = 256, n_dev: int = 64, seed: int = 0):
    """(train, dev) Batches of the parity task (data.synthetic), batch 32, ids < 100."""
    return synthetic(n_train, n_dev, batch_size=32, seq_len=12, vocab=100, seed=seed)
