"""torch's compiled flex_attention for the benchmarks that compile many mods
(zoo.py, backward.py, torch_reference.py).

Each mod, and each dtype, gives torch.compile a new graph. Past dynamo's
recompile limit (8 in torch 2.11) torch quietly runs its eager path instead,
about 40x slower, so the limit is raised here (docs/decisions.md).
"""
import torch
from torch.nn.attention.flex_attention import flex_attention

RECOMPILE_LIMIT = 1024


def compiled_flex_attention():
    """torch.compile(flex_attention, dynamic=False), default mode, with
    dynamo's recompile limit raised to RECOMPILE_LIMIT."""
    for knob in ("recompile_limit", "cache_size_limit"):  # the name before torch 2.6
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)
