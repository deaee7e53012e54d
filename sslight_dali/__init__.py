"""sslight-dali: SSLight self-supervised pre-training with GPU view sampling in NVIDIA DALI.

The Python API is `sslight_dali.api` (train, evaluate, export, embed, load_backbone; README, "Python API").
Importing the package or the API imports neither torch nor DALI.
"""
import os as _os

# torch's OpenMP threads spin after each parallel region; with DALI's CPU worker threads on the same
# cores that spinning starves both (figures: bench/README.md, "The figures behind choices in the code").
# It only takes effect if set before torch is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
