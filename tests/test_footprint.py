import torch
from torch import nn

import memkern


def test_counts_parameters_and_buffers_by_dtype_and_layer_type():
    model = nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20), nn.Linear(20, 5, bias=False).half())
    model.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    fp = memkern.memory_footprint(model)
    fp32 = (10 * 20 + 20) * 4 + 2 * 20 * 4
    fp16 = 20 * 5 * 2
    assert fp.by_dtype == {"float32": fp32, "float16": fp16, "int64": 24}
    assert fp.by_layer_type == {"Linear": (10 * 20 + 20) * 4 + fp16, "LayerNorm": 160, "Sequential": 24}
    assert fp.total_bytes == fp32 + fp16 + 24
    assert fp.parameters == 10 * 20 + 20 + 40 + 100


def test_shared_tensors_count_once():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert memkern.memory_footprint(model).total_bytes == (64 + 8) * 4


def test_meta_device_counts_what_it_will_take():
    with torch.device("meta"):
        model = nn.Linear(1000, 1000)
    assert memkern.memory_footprint(model).total_bytes == (1000 * 1000 + 1000) * 4
