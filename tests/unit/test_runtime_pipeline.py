from __future__ import annotations

import torch
from largo.runtime.pipeline import gpu_index


def test_a_bare_cuda_device_keeps_the_current_gpu_and_an_indexed_one_names_its_own() -> None:
    # `--device cuda` (and `auto` on a GPU) resolve to a bare "cuda": torch.cuda.set_device refuses it,
    # which once failed every NCCL pipeline as its group formed.
    assert gpu_index(torch.device("cuda")) is None
    assert gpu_index(torch.device("cuda:1")) == 1
    assert gpu_index(torch.device("cpu")) is None
    assert gpu_index(None) is None
