"""Test-wide settings. CPU torch on small machines is 50-200x slower with more than one
OpenMP thread, and no model hub is reachable: both are fixed before anything imports torch."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
