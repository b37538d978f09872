"""flexattn: attention with user-defined score and mask mods (Python package).

`flexattn.torch` is the PyTorch drop-in for torch.nn.attention.flex_attention;
`flexattn.numpy` runs mod text on numpy arrays on the CPU, without torch.
"""
from ._library import FlexError, backends, library_path, version  # noqa: F401

__version__ = "0.1.0"
