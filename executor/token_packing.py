"""A verify step's padding, skipped: the token-wise layers compute only the positions that hold a token.

A speculative verify step is one dense ``[rows, width]`` pass: a row with a shorter draft (or none) pads the
rest of its width, and each padded position would cost a whole token in every Linear layer, the head
included. During such a pass ``TokenPacking.only`` hooks the model's token-wise layers (``nn.Linear``,
transformers' ``Conv1D``, ``Int8Linear``): each gathers the real positions of its ``[rows, width, features]``
input, computes them alone, and puts its output back in the dense layout with zeros at the padding.

That is exact for the real positions: a row's padding follows its real positions, so causal attention keeps
it out of them, and the padding's key/value columns leave the storage at commit like a rejected draft's.
A layer called on another layout (a mixture-of-experts expert on routed tokens, a router on flattened tokens)
computes densely as before. Attention, norms and activations still see every position: the Linear layers
are what a position costs (about 90% of a token's arithmetic in the default model).
Measured (default model, 16 rows x ~900 tokens, a shared prefix): a width-9 step with 4 rows drafting
took 463 ms packed against 621 ms dense (a plain step: 208 ms).
"""

from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .quantize import Int8Linear

TOKEN_WISE = (nn.Linear, Conv1D, Int8Linear)


class TokenPacking:
    """The model's token-wise layers, hooked for one forward pass at a time."""

    def __init__(self, model):
        self.layers = [module for module in model.modules() if isinstance(module, TOKEN_WISE)]

    @staticmethod
    def positions(lengths: list, width: int, device) -> torch.Tensor:
        """Flat indices into ``[rows, width]`` of each row's first ``lengths[row]`` positions."""
        return torch.tensor([row * width + i for row, length in enumerate(lengths) for i in range(length)],
                            dtype=torch.long, device=device)

    @contextmanager
    def only(self, positions: torch.Tensor, rows: int, width: int):
        """During the block, layers called on ``[rows, width, features]`` compute only ``positions``."""
        packed_calls = []  # per call, in order: whether its input was packed (hooks come in pre/post pairs)

        def pack(_module, args):
            layout = args[0].shape
            packed = layout[:-1] == (rows, width)
            packed_calls.append(packed)
            if packed:
                return (args[0].reshape(rows * width, layout[-1]).index_select(0, positions),) + args[1:]
            return None

        def unpack(_module, _args, output):
            if not packed_calls.pop():
                return None
            dense = output.new_zeros(rows * width, output.shape[-1])
            return dense.index_copy_(0, positions, output).view(rows, width, output.shape[-1])

        handles = []
        try:
            for layer in self.layers:
                handles.append(layer.register_forward_pre_hook(pack))
                handles.append(layer.register_forward_hook(unpack))
            yield
        finally:
            for handle in handles:
                handle.remove()
