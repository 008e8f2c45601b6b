"""Evaluation: a model's dev metrics (train.py calls it after every epoch), and a saved run's
adapters scored again without training:

    python train.py --model=minilm --task=sst2 --eval_adapters=results/<run>.peft

The folder must be saved for that model and task (adapters.load_peft checks its record).
"""
from types import SimpleNamespace

import torch

from adapters import load_peft
from config import Config, autocast_for, check_config, resolve_device, resolve_precision
from data import RANDOM_MODELS, TASKS, load_model, make_batches
from record import metrics


@torch.no_grad()
def evaluate(run) -> dict:
    """Dev accuracy and MCC, and each dev example's prediction (file order), batched by length. `run`: a
    train.Run, or anything with its model, dev_b, device and autocast."""
    run.model.eval()
    preds = torch.empty(len(run.dev_b.labels), dtype=torch.long)
    for idx in run.dev_b.order(seed=None):
        inputs = {k: v.to(run.device) for k, v in run.dev_b.collate(idx).items() if k != "labels"}
        with run.autocast():
            logits = run.model(**inputs).logits
        preds[idx] = logits.argmax(-1).cpu()
    return metrics(preds, run.dev_b.labels) | {"preds": preds.tolist()}


def evaluate_adapters(cfg: Config) -> dict:
    """--eval_adapters=FOLDER: a saved peft folder's adapters and head on --model, scored on
    --task's dev set (or --heldout); the folder must be saved for that model and task. Trains and
    writes nothing."""
    check_config(cfg)
    device = resolve_device(cfg.device)
    # as prepare(): a random model (tiny-bert) is the run's with its seed
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model)
    expect = {"task": cfg.task, "model": cfg.model}
    if cfg.model in RANDOM_MODELS:
        expect["seed"] = cfg.seed
    saved = load_peft(model, cfg.eval_adapters, expect)
    _, dev_b = make_batches(cfg.task, cfg.glue_dir, tok, cfg.max_length, cfg.batch_size,
                            1, cfg.max_eval, cfg.seed, cfg.heldout)  # max_train 1: train is unused
    autocast = autocast_for(device, resolve_precision(cfg.precision, device.type)[0])
    run = SimpleNamespace(model=model.to(device), dev_b=dev_b, device=device, autocast=autocast)
    dev = evaluate(run)
    metric = TASKS[cfg.task][1]
    split = "held-out" if cfg.heldout else "dev"
    its = f" on its first {saved['max_eval']}" if saved.get("max_eval") else ""
    print(f"{cfg.eval_adapters} ({saved['method']}): {metric} {dev[metric]:.4f} on "
          f"{len(dev_b.labels)} {split} examples; the run recorded {saved['final']:.4f}{its}")
    return dev
