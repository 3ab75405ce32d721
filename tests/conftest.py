"""Shared test helpers: references that the mesh is compared with, and transformers blocks
loaded with the same weights as a moemesh WeightSource."""

from __future__ import annotations

import os

import torch

# Keep the 2-core machine responsive when several servers share it.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
