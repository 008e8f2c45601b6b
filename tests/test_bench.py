"""bench.py runs: the interleaved whole runs are the same runs train.py makes, so their timings are honest."""
import dataclasses

from bench import runs
from test_train import tiny
from train import train


def test_interleaved_runs_reproduce_standalone_runs(tmp_path, glue_dir, monkeypatch):
    cfg = tiny(tmp_path, glue_dir, fw_warmup_steps=3, ada_t_init=2, ada_t_final=4, ada_delta_t=2,
               lora_dropout=0.1)  # dropout draws the global RNG: interleaving must not mix the runs' streams
    monkeypatch.chdir(tmp_path)  # bench writes results/ under the working directory
    out = runs(cfg, ["lora", "fwlora", "adalora"])
    assert out["steps"] == 16 and (tmp_path / "results" / "runs_sst2_b0.5_cpu.json").exists()
    for m, row in out["runs"].items():
        alone = train(dataclasses.replace(cfg, method=m))["epochs"][-1]
        assert (row["train_loss"], row["accuracy"], row["mcc"]) == \
            (alone["train_loss"], alone["accuracy"], alone["mcc"]), m  # the same trajectory, bit for bit
        assert row["train_ms_total"] > 0
    assert out["runs"]["lora"]["total_ratio"] == 1.0
    fw = out["runs"]["fwlora"]
    assert fw["fw_warmup_steps"] == 3 and fw["warmup_ms_total"] < fw["train_ms_total"]
