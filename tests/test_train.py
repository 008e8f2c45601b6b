"""train(): config parsing, every bad input's message, determinism, FW-LoRA(λ=0) = LoRA, one backward
per step, AdaLoRA really prunes, results written atomically, and a short real run that learns."""
import json
import os

import pytest
import torch

from train import Config, parse_args, train


def tiny(tmp_path, glue, **kw):
    """tiny-bert (hidden 32, FFN 64, 2 layers: 896 adapter parameters per unit of rank) on capped SST-2."""
    base = dict(model="tiny-bert", task="sst2", glue_dir=glue, max_train=256, max_eval=64, epochs=2,
                lr=2e-3, budget=0.5, out_dir=str(tmp_path), log_every=4,
                fw_warmup_max_frac=0.5)  # 16 steps: let the Fisher warm-up last a few of them
    return Config(**(base | kw))


def test_parse_args_types_and_errors():
    cfg = parse_args(["--lr=1e-3", "--epochs=2", "--method=fwlora", "--save_adapters=true", "--glue_dir="])
    assert (cfg.lr, cfg.epochs, cfg.method, cfg.save_adapters, cfg.glue_dir) == (1e-3, 2, "fwlora", True, "")
    for bad in (["--nope=1"], ["--epochs=two"], ["lr=1"], ["--save_adapters=maybe"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.parametrize("kw, message", [
    (dict(task="mnli"), "unknown task 'mnli'"),
    (dict(method="dora"), "unknown method 'dora'"),
    (dict(budget=0), "budget must be > 0"),
    (dict(budget=-0.2), "budget must be > 0"),
    (dict(budget=0.001), "below half of rank 1"),
    (dict(glue_dir="/nonexistent"), "point --glue_dir"),
    (dict(method="adalora", epochs=1, ada_t_init=5, ada_t_final=5), "lower --ada_t_init or --ada_t_final"),
])
def test_bad_input_messages(tmp_path, glue_dir, kw, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(tiny(tmp_path, glue_dir, **kw))
    assert not os.listdir(tmp_path)  # rejected before any work: nothing written, nothing overwritten


def test_hub_model_offline_message(tmp_path, glue_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline, use --model=minilm"):
        train(tiny(tmp_path, glue_dir, model="roberta-base-not-cached"))


def test_nan_loss_stops_names_step_and_keeps_results(tmp_path, glue_dir):
    with pytest.raises(FloatingPointError, match=r"NaN or inf at step \d+"):
        train(tiny(tmp_path, glue_dir, lr=1e30, log_every=2))
    err = json.load(open(tmp_path / "sst2_lora_b0.5_s0.error.json"))
    assert err["status"] == "error" and "step" in err["error"]
    assert not (tmp_path / "sst2_lora_b0.5_s0.json").exists()


def test_same_seed_same_metrics_and_atomic_files(tmp_path, glue_dir):
    a = train(tiny(tmp_path, glue_dir, run_name="a"))
    b = train(tiny(tmp_path, glue_dir, run_name="b"))
    assert a["epochs"] == b["epochs"]
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.json"]  # no temp, partial or error files left
    saved = json.load(open(tmp_path / "a.json"))
    assert saved["status"] == "ok" and saved["final"] == a["final"]
    budget = saved["budget"]
    assert budget["adapter_params"] == budget["rank"] * 2 * (4 * (32 + 32) + 2 * (32 + 64))
    assert budget["adapter_pct"] == pytest.approx(100 * budget["adapter_params"] / budget["n_base_params"])


def test_fwlora_with_zero_lambda_follows_lora_exactly(tmp_path, glue_dir):
    lora = train(tiny(tmp_path, glue_dir, method="lora"))
    fw = train(tiny(tmp_path, glue_dir, method="fwlora", fw_lambda=0.0, fw_warmup_steps=3))
    assert fw["budget"]["fw_warmup_steps"] == 3 and fw["fw"]["penalty_log"]  # the penalty path ran
    assert fw["epochs"] == lora["epochs"]  # identical losses and metrics, bit for bit


@pytest.mark.parametrize("T, K", [(250, 25), (804, 80), (6315, 500), (5, 1)])
def test_fisher_warmup_length_rule(T, K):
    from conftest import tiny_model
    from train import build_method
    _, _, fw, info = build_method(Config(method="fwlora", budget=50.0), tiny_model(), T)
    assert fw.warmup_steps == info["fw_warmup_steps"] == K  # min(500, 10% of T), at least 1


def test_exactly_one_backward_per_step(tmp_path, glue_dir, monkeypatch):
    calls = []
    real = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (calls.append(1), real(self, *a, **k)))
    r = train(tiny(tmp_path, glue_dir, method="fwlora", fw_warmup_steps=3))
    assert len(calls) == r["epochs"][-1]["steps"] == 16


def test_fwlora_and_l2lora_diagnostics(tmp_path, glue_dir):
    fw = train(tiny(tmp_path, glue_dir, method="fwlora", fw_warmup_steps=4))["fw"]
    l2 = train(tiny(tmp_path, glue_dir, method="l2lora", fw_warmup_steps=4))["fw"]
    imp = [m["importance"] for m in fw["per_matrix"].values()]
    assert len(imp) == 12 and abs(sum(imp) - 1) < 1e-5
    assert fw["weight_min"] < fw["weight_max"]
    assert l2["weight_min"] == l2["weight_max"] == pytest.approx(1 - 1 / 12)
    assert all(m["delta_w_fro"] > 0 for m in fw["per_matrix"].values())


def test_adalora_run_prunes_to_target(tmp_path, glue_dir):
    r = train(tiny(tmp_path, glue_dir, method="adalora", epochs=3, ada_delta_t=2))
    ada, budget = r["adalora"], r["budget"]
    assert ada["total_rank"] == ada["target_total_rank"] == budget["rank"] * 12
    assert budget["ada_init_rank"] > budget["rank"]  # it started larger and really pruned
    assert sum(ada["rank_pattern"].values()) == ada["total_rank"]
    ffn = lambda n: n.endswith("intermediate.dense") or (n.endswith("output.dense") and "attention" not in n)
    assert budget["adapter_params"] == sum(k * ((32 + 64 if ffn(n) else 32 + 32) + 1)  # d_in + d_out + 1
                                           for n, k in ada["rank_pattern"].items())


def test_short_minilm_run_learns_sst2(tmp_path, glue_dir):
    r = train(Config(model="minilm", task="sst2", glue_dir=glue_dir, max_train=320, max_eval=200, epochs=2,
                     lr=2e-3, budget=0.5, out_dir=str(tmp_path)))
    assert r["epochs"][-1]["train_loss"] < r["epochs"][0]["train_loss"]
    assert r["final"] >= 0.7 and r["epochs"][-1]["mcc"] > 0.3  # chance is 0.5 / MCC 0
