"""Interop with peft (the project never imports it; this test does). A run trained here with
--save_adapters=true leaves a `.peft/` folder that peft's PeftModel.from_pretrained loads onto a
fresh base model with the trained model's logits (≤ 1e-5, fp32), without a missing- or
unexpected-key warning; peft's own save of it loads back here with the same logits. LoRA, fwrank
(mixed ranks, one matrix at rank 0), FW-LoRA and AdaLoRA after pruning (a kept pattern that is not
a prefix, one matrix at k = 0), on tiny random BERT, RoBERTa and MPNet."""
import copy
import logging
import re
import warnings
from contextlib import contextmanager

import pytest
import torch

peft = pytest.importorskip("peft")

import train as train_module  # noqa: E402  (after the skip)
from adapters import load_peft  # noqa: E402
from helpers import tiny, tiny_batch, tiny_model, toy_data  # noqa: E402
from lora import LoRALinear, target_names  # noqa: E402

KEY_WARNING = re.compile(r"missing adapter keys|missing keys|unexpected keys", re.I)
# forced allocation: mixed, matrix 0 not adapted
FWRANK_RANKS = [0, 1, 3, 2, 4, 2, 1, 3, 2, 2, 5, 2]


def base_model(kind: str, seed: int = 0):
    """A tiny random classifier (hidden 16, FFN 24, 2 layers, 12 target matrices); seeded."""
    if kind != "mpnet":
        return tiny_model(kind, seed)
    from transformers import MPNetConfig, MPNetForSequenceClassification
    torch.manual_seed(seed)
    config = MPNetConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=40, num_labels=2,
                         pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return MPNetForSequenceClassification(config).eval()


@contextmanager
def no_key_warnings(caplog):
    """Fail on a warning (or log record) about missing or unexpected keys: peft loads such a file
    anyway and leaves the module at its init."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        yield
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if KEY_WARNING.search(s)], said


def prune_to_test_pattern(ada):
    """AdaLoRA's last mask, replaced after the last step: matrix 0 keeps nothing (k = 0), matrix 1
    every other triplet (not a prefix); kept E scaled up so that ΔW moves the logits far more than
    the tolerance."""
    r0 = ada.ranks0[0]
    ada.keep[0] = torch.zeros(r0, 1)
    ada.keep[1] = (torch.arange(r0) % 2 == 0).float().view(-1, 1)  # 1, 0, 1, 0, ...
    for layer, keep in zip(ada.layers, ada.keep):
        layer.lora_E.data.mul_(keep).mul_(30.0)


def train_and_export(tmp_path, monkeypatch, kind: str, method: str):
    """A few real training steps (train.train, the base model swapped for the tiny one) with
    --save_adapters=true; returns (the trained model, the run's .peft folder)."""
    trained = {}

    def load_model(name):  # the run's model, kept for the comparison
        trained["model"] = base_model(kind)
        return trained["model"], None
    monkeypatch.setattr(train_module, "load_model", load_model)
    monkeypatch.setattr(train_module, "allocate_ranks", lambda *a: FWRANK_RANKS)
    real_step = train_module.train_step

    def train_step(run, batch, step):
        out = real_step(run, batch, step)
        if run.method.ada and step + 1 == run.T:
            prune_to_test_pattern(run.method.ada)
        return out
    monkeypatch.setattr(train_module, "train_step", train_step)
    cfg = tiny(tmp_path, model=f"tiny-{kind}", method=method, budget=15, epochs=3, lr=2e-2,
               max_length=12, fw_warmup_steps=2, save_adapters=True)  # 6 steps; rank 3 (AdaLoRA 5)
    train_module.train(cfg, toy_data(64, 32))
    return trained["model"].eval(), tmp_path / f"sst2_{method}_b15_s0.peft"


def without_adapters(model):
    """The model with every ΔW set to 0 (B = 0): how far the adapters move the logits."""
    bare = copy.deepcopy(model)
    for m in bare.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.data.zero_()
    return bare


@pytest.mark.parametrize("kind", ["bert", "roberta", "mpnet"])
@pytest.mark.parametrize("method", ["lora", "fwrank", "fwlora", "adalora"])
def test_a_run_exported_here_loads_in_peft_and_back(tmp_path, monkeypatch, caplog, kind, method):
    assert len(target_names(base_model(kind))) == 12  # q, k, v, o, FFN in and out (MPNet's too)
    model, folder = train_and_export(tmp_path, monkeypatch, kind, method)
    batch = tiny_batch(seed=1, n=6, length=9)
    batch.pop("labels")
    with torch.no_grad():
        ref = model(**batch).logits
        moved = (ref - without_adapters(model)(**batch).logits).abs().max()
        assert moved > 1e-3  # the adapters move the logits 100× the tolerance below
        with no_key_warnings(caplog):
            in_peft = peft.PeftModel.from_pretrained(base_model(kind), str(folder)).eval()
        assert (in_peft(**batch).logits - ref).abs().max() <= 1e-5
        here = base_model(kind)
        expect = {"task": "sst2", "model": f"tiny-{kind}", "method": method}
        record = load_peft(here, str(folder), expect)
        assert (here.eval()(**batch).logits - ref).abs().max() <= 1e-5
        in_peft.save_pretrained(str(tmp_path / "resaved"))  # peft's own writer, from what it loaded
        again = base_model(kind)
        assert load_peft(again, str(tmp_path / "resaved"), {}, check_meta=False) == {}  # no record
        assert (again.eval()(**batch).logits - ref).abs().max() <= 1e-5
    adapted = {n: m for n, m in in_peft.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    if method == "fwrank":
        names = target_names(base_model(kind))
        # all but matrix 0 (rank 0)
        assert {n.removeprefix("base_model.model.") for n in adapted} == set(names[1:])
        ranks = [adapted[f"base_model.model.{n}"].r["default"] for n in names[1:]]
        assert ranks == FWRANK_RANKS[1:]
    if method == "adalora":
        names = target_names(base_model(kind))
        kept = [record["adalora"]["rank_pattern"][n] for n in names]
        assert kept[:2] == [0, 3]  # init rank 5: triplets 0, 2, 4
        loaded = [adapted[f"base_model.model.{n}"].lora_E["default"].shape[0] for n in names]
        assert loaded == kept


def test_the_warning_guard_sees_a_missing_key(tmp_path, monkeypatch, caplog):
    """The guard above can fail: a folder with an adapter key removed loads in peft with a
    warning."""
    from safetensors.torch import load_file, save_file
    _, folder = train_and_export(tmp_path, monkeypatch, "bert", "lora")
    state = load_file(str(folder / "adapter_model.safetensors"))
    state.pop(next(k for k in state if "lora_B" in k))
    save_file(state, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AssertionError, match="Found missing adapter keys"):
        with no_key_warnings(caplog):
            peft.PeftModel.from_pretrained(base_model("bert"), str(folder))


@pytest.mark.parametrize("kind", ["bert", "roberta", "mpnet"])
def test_an_adapter_made_by_peft_loads_here(tmp_path, kind):
    """peft's own LoRA (suffix targets; rank_pattern and alpha_pattern keys that match by suffix)
    and AdaLoRA (its pruning's rank_pattern) load here with peft's logits."""
    suffixes = {"bert": ["query", "value", "output.dense"],
                "mpnet": ["attn.q", "attn.o", "output.dense"],
                "roberta": ["key", "intermediate.dense", "layer.1.output.dense"]}[kind]
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=5, target_modules=suffixes,
                           rank_pattern={"layer.1.output.dense": 4},
                           alpha_pattern={"layer.0.output.dense": 3})
    ada = peft.AdaLoraConfig(task_type="SEQ_CLS", init_r=4, target_r=2, lora_alpha=6, total_step=10,
                             target_modules=suffixes)
    batch = tiny_batch(seed=2)
    batch.pop("labels")
    for name, config in (("lora", lora), ("adalora", ada)):
        made = peft.get_peft_model(base_model(kind), config).eval()
        for n, p in made.named_parameters():  # adapters and head far from their init: they matter
            if "lora_" in n or "modules_to_save" in n:
                torch.nn.init.normal_(p.data, std=0.5)
        if name == "adalora":  # what peft's allocator leaves: E masked, the mask in rank_pattern
            pattern = {}
            for n, m in made.named_modules():
                if hasattr(m, "lora_E") and "default" in m.lora_E:
                    g = torch.Generator().manual_seed(len(pattern))
                    mask = torch.rand(4, generator=g) > 0.5
                    m.lora_E["default"].data *= mask.view(-1, 1)
                    pattern[f"{n.removeprefix('base_model.model.')}.lora_E"] = mask.tolist()
            made.peft_config["default"].rank_pattern = pattern
        with torch.no_grad():
            ref = made(**batch).logits
            made.save_pretrained(str(tmp_path / name))
            here = base_model(kind)
            load_peft(here, str(tmp_path / name), {}, check_meta=False)
            assert (here.eval()(**batch).logits - ref).abs().max() <= 1e-5, name
            moved = (base_model(kind).eval()(**batch).logits - ref).abs().max()
            assert moved > 1e-3  # what was loaded matters
