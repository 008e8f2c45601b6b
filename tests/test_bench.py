"""bench.py: interleaved whole runs are the runs train.py makes (so their timings are honest), and the GPU
acceptance check runs end to end in its tiny CPU mode (so it cannot rot before a GPU is at hand)."""
import dataclasses
import json

import pytest
import torch

import bench
from helpers import tiny, toy_data
from train import train


def test_interleaved_runs_reproduce_standalone_runs(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, fw_warmup_steps=3, ada_t_init=2, ada_t_final=4, ada_delta_t=2,
               lora_dropout=0.1)  # dropout draws the global RNG: interleaving must not mix the runs' streams
    out = bench.runs({m: dataclasses.replace(cfg, method=m) for m in ("lora", "fwlora", "adalora")}, toy_data())
    assert out["steps"] == 16 and (tmp_path / "bench_runs_sst2_lora-fwlora-adalora_b0.5_s0.json").exists()
    for m, row in out["runs"].items():
        alone = train(dataclasses.replace(cfg, method=m), toy_data())["epochs"][-1]
        assert (row["train_loss"], row["accuracy"], row["mcc"]) == \
            (alone["train_loss"], alone["accuracy"], alone["mcc"]), m  # the same trajectory, bit for bit
        assert row["train_s"] > 0
    fw = out["runs"]["fwlora"]  # each ratio is its run's training time over LoRA's, from the recorded buckets
    assert fw["total_ratio"] == pytest.approx(fw["train_s"] / out["runs"]["lora"]["train_s"])
    assert out["runs"]["fwlora"]["fw_warmup_steps"] == 3


def test_gpu_acceptance_check_in_tiny_cpu_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["gpu", "--tiny=true"]) == 0
    saved = json.load(open(tmp_path / "results" / "bench_steps_tiny-bert_bf16_cpu.json"))
    assert saved["config"]["precision"] == "bf16" and set(saved["variants"]) == set(bench.VARIANTS)
    assert 8 < saved["tokens_per_step"] / 32 < 40  # real SST-2 sentences (about 13 tokens), not synthetic 32-64
    t = saved["variants"]
    assert t["adalora"]["ratio"] == t["adalora"]["ms_per_step_median"] / t["lora"]["ms_per_step_median"]
    assert all(r["ms_per_step_median"] > 0 and r["gflop_per_s"] > 0 for r in t.values())
    assert "fisher" in t["fwlora_warmup_probe32"]["buckets_ms_per_step"]
    assert "penalty" in t["fwlora_penalised"]["buckets_ms_per_step"]
    assert "allocator" in t["adalora_masking"]["buckets_ms_per_step"]
    floor = saved["gemm_floor"]  # tiny-bert: T x 32 x 32, and the FFN's T x 32 x 64 and T x 64 x 32 both ways
    assert len(floor["gflop_per_s_by_shape"]) == 3 and floor["gemm_ms_per_step"] > 0
    assert saved["lora_top_ops_ms"] and saved["precision"] == "bf16"
    out = capsys.readouterr().out
    assert "skip (tiny CPU mode): a CUDA device" in out and "FAIL" not in out
    assert "PASS: bf16 autocast active in every method" in out and f"PASS: every method ran ({len(bench.METHODS)})" in out


def test_gpu_mode_refuses_a_machine_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "hub_reachable", lambda: False)
    assert bench.main(["gpu"]) == 1
    assert "--device=cuda, but this torch" in capsys.readouterr().err and not (tmp_path / "results").exists()


def test_step_flops_by_hand():
    from train import prepare
    run = prepare(tiny("."), toy_data())  # tiny-bert: hidden 32, FFN 64, 2 layers
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    per_token = 4 * 2 * (4 * 32 * 32 + 2 * 32 * 64)  # 4 flops per weight; q, k, v, o, FFN in, FFN out; 2 layers
    assert bench.step_flops(run, batch) == per_token * 5 + 12 * 2 * 32 * (3 ** 2 + 2 ** 2)


def test_fisher_gate_reads_the_exact_runs_gradients_with_every_probe_count(tmp_path):
    """Probe proxies on the exact run's own X and G: with thousands of probes the estimate is all but exact
    (Spearman near 1); with one probe it is not. One row per seed and probe count."""
    cfg = tiny(tmp_path, task="cola", max_train=320, epochs=1, fw_warmup_max_frac=0.5)
    table = bench.fisher_gate(cfg, [0], [1, 4096])
    assert set(table) == {"cola seed 0 k=1", "cola seed 0 k=4096"} and table["cola seed 0 k=1"]["K"] == 5
    assert table["cola seed 0 k=4096"]["spearman_I"] > 0.99 and table["cola seed 0 k=4096"]["gate"] == "pass"
    assert table["cola seed 0 k=4096"]["median_rel_err_F"] < table["cola seed 0 k=1"]["median_rel_err_F"]
    assert (tmp_path / "bench_fisher_cola_tiny-bert_probe1-4096_fp32.json").exists()


def test_cpu_clock_needs_one_thread_and_is_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert bench.main(["runs", "--clock=cpu", "--model=tiny-bert", f"--out_dir={tmp_path}"]) == 1
    assert "OMP_NUM_THREADS=1" in capsys.readouterr().err
    cfg = tiny(tmp_path)
    out = bench.runs({"lora": cfg}, toy_data(), cpu_time=True)
    assert out["clock"] == "process CPU time, one thread" and out["runs"]["lora"]["train_s"] > 0
