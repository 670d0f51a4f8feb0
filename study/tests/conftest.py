import os
import sys

import torch

# the small reference networks of the plug-in's tests (tests/reference_models.py)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "tests"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
