"""`import pynvml` for processes the tests start (Ray workers): the fake NVML of tests/fakes/fake_nvml.py,
answering from the snapshot file named by FAKE_NVML_SNAPSHOT. Put this folder first on PYTHONPATH."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1].parent))  # tests/, for fakes

from fakes.fake_nvml import fake_nvml

from smartrun.hardware import load_snapshot

globals().update({k: v for k, v in vars(fake_nvml(load_snapshot(os.environ["FAKE_NVML_SNAPSHOT"]))).items()
                  if not k.startswith("__")})
