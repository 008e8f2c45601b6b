"""pytest hooks only; the shared test helpers (tiny models, synthetic batches) are in helpers.py."""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the project's modules, and `from helpers import ...`


def pytest_configure(config):
    slow = "slow: real pretrained model or real data (runs in CI; skip with -m 'not slow')"
    config.addinivalue_line("markers", slow)
    # a skipped test says why in the summary (SLURM's, where it is missing)
    config.option.reportchars += "s"
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2`: one worker per core, one thread each
        torch.set_num_threads(1)
