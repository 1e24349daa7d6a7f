"""``--quantize int4``: 4-bit Linear weights in groups of 32, as a GGUF file keeps them, on a CPU.

A GGUF file of 4-bit blocks (llama.cpp's Q4_0 and Q4_1: 32 weights share a scale, and Q4_1 a minimum too) is
what users download; dequantizing it to float32 (what transformers does) reads ~7x its bytes per token and
needs ~7x its RAM. Here each body Linear keeps 4 bits per weight in ATen's int4 CPU layout
(``_convert_weight_to_int4pack_for_cpu``) and multiplies with ATen's kernel (``_weight_int4pack_mm_for_cpu``),
which reads bfloat16 inputs and one (scale, zero) pair per group: ``w = (q - 8) * scale + zero``.

The levels come from the loaded weights, not from the file's bytes (no tensor-name mapping, no q/k row
permutation to redo): llama.cpp's reference Q4_1 quantizer puts each block's minimum at level 0 and its
maximum at level 15, and Q4_0's puts the block's largest magnitude at level 0 with no offset, so the float32
copy's group min/max (or signed peak) give back the file's levels exactly, and its scales to bfloat16's
rounding (``four_bit_groups``). For any other model the same grid is a plain min/max 4-bit quantization.

The output head stays 8-bit (``Int8RowsLinear``: one scale per row, bfloat16 inputs, ``_weight_int8pack_mm``):
GGUF files keep the (tied) embedding at 6-8 bits, and 4 bits there cost the default model +4% perplexity.
Layers that read one input (q/k/v after a norm, gate/up in an MLP) are stacked into one matmul
(``SharedInput``, int8 does the same): one input conversion and one kernel call where there were three (two);
a stacked row's groups are its own layer's, so the levels stay the file's.
Measured on the default model (Q4_1 body, Q8_0 embedding): perplexity +0.1% against its float32 copy, and each
layer computes the same numbers alone or beside other rows (tests/unit/test_int4.py).
"""

import ctypes
import logging
import threading
import time

import torch
from torch import nn

log = logging.getLogger("jina_llm_stream.quantize")

GROUP = 32  # weights per (scale, zero) pair: a GGUF Q4 block
LEVELS = 15  # the largest 4-bit level
# GGUF kinds whose blocks four_bit_groups gives back exactly, and whether the grid is symmetric (no offset).
EXACT_GGUF_KINDS = {"Q4_0": True, "Q4_1": False}


def four_bit_groups(weight: torch.Tensor, symmetric: bool) -> tuple:
    """(levels [out, in] int32 in 0..15, scales [out, in/GROUP], zeros [out, in/GROUP]) with
    ``weight ~ (levels - 8) * scale + zero`` per group of GROUP input channels. ``symmetric``: Q4_0's grid (the
    group's signed peak at level 0, zero 0); else Q4_1's (minimum at level 0, maximum at level 15)."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // GROUP, GROUP)
    if symmetric:
        peak = groups.gather(2, groups.abs().argmax(dim=2, keepdim=True)).squeeze(2)
        scales = peak / -8
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        zeros = torch.zeros_like(scales)
        levels = (groups / scales[..., None] + 8).round()
    else:
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        scales = (high - low) / LEVELS
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        zeros = low + 8 * scales
        levels = ((groups - low[..., None]) / scales[..., None]).round()
    levels = levels.clamp_(0, LEVELS).to(torch.int32).reshape(out_features, in_features)
    return levels, scales, zeros


def fits_int4(linear: nn.Linear) -> bool:
    """ATen's int4 layout wants output rows in sixteens and whole groups of inputs."""
    return linear.out_features % 16 == 0 and linear.in_features % GROUP == 0


class WeightOnlyLinear(nn.Module):
    """A Linear whose packed weight an ATen CPU kernel multiplies by bfloat16 inputs (``multiply``: [rows, in]
    bfloat16 -> [rows, out] bfloat16); the output returned in the input's dtype, the bias added in float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def multiply(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.multiply(x.reshape(-1, shape[-1]).to(torch.bfloat16)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def matmul_input_dtype(model) -> torch.dtype:
    """The narrowest float the model's matmuls read: bfloat16 where a ``WeightOnlyLinear`` rounds its inputs
    (int4 layers, int8's head), else the parameters' own dtype."""
    if any(isinstance(module, WeightOnlyLinear) for module in model.modules()):
        return torch.bfloat16
    return next(model.parameters()).dtype


class Int4Linear(WeightOnlyLinear):
    """4-bit levels in groups of GROUP inputs, each group with a bfloat16 scale and zero (ATen's int4 kernel)."""

    def __init__(self, linear: nn.Linear, symmetric: bool = False):
        super().__init__(linear)
        levels, scales, zeros = four_bit_groups(linear.weight, symmetric)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1))
        # [groups, out, 2]: the kernel's layout of the (scale, zero) pairs
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous().bfloat16())

    def weight_as_float(self) -> torch.Tensor:
        """The weight this layer multiplies by ([out, in] float32), for checks."""
        identity = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self.multiply(identity).float().t()

    def multiply(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={GROUP}"


class Int8RowsLinear(WeightOnlyLinear):
    """An int8 weight with one bfloat16 scale per output row (weight-only: the inputs are not quantized;
    ATen's ``_weight_int8pack_mm``). For the output head, whose rows GGUF files keep at 6-8 bits."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("int8_weight", (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.bfloat16())

    def multiply(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(rows, self.int8_weight, self.scales)


class SharedInput(nn.Module):
    """Linear layers that read the very same input (q/k/v; gate/up) as one ``layer`` over their stacked
    weights (``stacked_linear``), of output ``widths``: one wider matmul where three (two) did it all again.
    Each original layer becomes a ``SharedInputSlice``: the first one called with an input computes the stacked
    output and the others take their columns of it."""

    def __init__(self, layer: nn.Module, widths: list):
        super().__init__()
        self.layer, self.widths = layer, list(widths)
        # Per thread: engines sharing a model step it from threads of their own.
        self._last = threading.local()

    def columns(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """Member ``member``'s output for ``x``: computed once per input for the whole stack."""
        last = self._last
        if getattr(last, "input", None) is not x or member in last.read:
            last.outputs = self.layer(x).split(self.widths, dim=-1)
            last.input, last.read = x, set()
        last.read.add(member)
        output = last.outputs[member]
        if len(last.read) == len(self.widths):  # every member has its columns: hold no tensor between passes
            last.input = last.outputs = None
        return output


class SharedInputSlice(nn.Module):
    """One layer of a ``SharedInput`` stack: its columns of the stacked output."""

    def __init__(self, stack: SharedInput, member: int):
        super().__init__()
        self.stack, self.member = stack, member
        self.in_features, self.out_features = stack.layer.in_features, stack.widths[member]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack.columns(x, self.member)

    def extra_repr(self) -> str:
        return f"member {self.member} of a shared-input stack of {type(self.stack.layer).__name__}, " \
               f"out_features={self.out_features}"


def stacked_linear(linears: list) -> nn.Linear:
    """One float32 Linear whose output is the ``linears``' outputs side by side (a missing bias: zeros)."""
    stacked = nn.Linear(linears[0].in_features, sum(linear.out_features for linear in linears),
                        bias=any(linear.bias is not None for linear in linears))
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([linear.weight.detach().float() for linear in linears]))
        if stacked.bias is not None:
            stacked.bias.copy_(torch.cat([torch.zeros(linear.out_features) if linear.bias is None
                                          else linear.bias.detach().float() for linear in linears]))
    return stacked


@torch.inference_mode()
def inputs_read(model, modules: dict, ids_list: list, peaks: dict | None = None) -> list:
    """Run ``ids_list`` through the model and note what each of ``modules`` ({name: Linear}) read: per pass,
    [(name, the input tensor itself)] (its identity is what ``shared_input_groups`` compares); with ``peaks``,
    also {name: its largest |input| per channel} (int8's SmoothQuant factors)."""
    hooks, inputs_by_pass = [], []
    for name, module in modules.items():
        def hook(_module, inputs, _output, name=name):
            if peaks is not None:
                peak = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).float()
                peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
            inputs_by_pass[-1].append((name, inputs[0]))
        hooks.append(module.register_forward_hook(hook))
    try:
        device = next(model.parameters()).device
        for ids in ids_list:
            inputs_by_pass.append([])
            model(input_ids=torch.tensor([ids], device=device))
    finally:
        for handle in hooks:
            handle.remove()
    return inputs_by_pass


def shared_input_groups(inputs_by_pass: list) -> list:
    """Groups (2 or more names, in call order) whose members read one tensor object in every pass, each name
    called once per tensor: q/k/v after a norm, gate/up in an MLP. A layer read twice, or with another
    partner in another pass, stays alone."""
    partners = None
    for reads in inputs_by_pass:
        groups = {}
        for name, tensor in reads:
            groups.setdefault(id(tensor), (tensor, []))[1].append(name)
        found = {name: tuple(names) for _, names in groups.values() for name in names
                 if len(set(names)) == len(names)}
        partners = found if partners is None else {n: g for n, g in partners.items() if found.get(n) == g}
    return sorted({group for group in (partners or {}).values() if len(group) > 1})


def gguf_linear_kinds(path) -> dict:
    """{GGUF quantization kind: how many 2-D weights of the transformer blocks hold it} (the file's header only)."""
    from gguf import GGUFReader

    kinds = {}
    for tensor in GGUFReader(str(path)).tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            kinds[tensor.tensor_type.name] = kinds.get(tensor.tensor_type.name, 0) + 1
    return kinds


def exact_gguf_grid(kinds: dict) -> bool | None:
    """Whether a GGUF file's block weights are all one 4-bit kind four_bit_groups gives back exactly: True for
    Q4_0's symmetric grid, False for Q4_1's, None when they are not (another kind, or a mix)."""
    grids = {EXACT_GGUF_KINDS.get(kind) for kind in kinds}
    return grids.pop() if len(grids) == 1 and None not in grids else None


def quantize_int4(model, symmetric: bool = False) -> int:
    """Replace the model's body Linear layers by Int4Linear (siblings that read one input stacked: SharedInput)
    and its output head by Int8RowsLinear, in place; the number replaced. A layer whose shape ATen's int4 layout
    cannot hold (fits_int4) keeps float32 (logged)."""
    started = time.monotonic()
    targets = linear_layers(model)
    if not targets:
        raise ValueError(f"quantize=int4: {type(model).__name__} has no nn.Linear layers to quantize")
    head = model.get_output_embeddings()
    kept = [name for name, linear in targets.items() if linear is not head and not fits_int4(linear)]
    vocabulary = model.get_input_embeddings().num_embeddings
    groups = [group for group in shared_input_groups(inputs_read(model, targets, [[i % vocabulary for i in range(8)]]))
              if all(targets[name] is not head and name not in kept for name in group)]
    for group in groups:
        linears = [targets[name] for name in group]
        stack = SharedInput(Int4Linear(stacked_linear(linears), symmetric), [linear.out_features for linear in linears])
        for member, name in enumerate(group):
            replace_module(model, name, SharedInputSlice(stack, member))
    stacked = {name for group in groups for name in group}
    packed = len(stacked)
    for name, linear in targets.items():
        if linear is head:
            replace_module(model, name, Int8RowsLinear(linear))
        elif name not in stacked and name not in kept:
            replace_module(model, name, Int4Linear(linear, symmetric))
            packed += 1
    release_freed_memory(model)
    if kept:
        log.warning("quantize=int4: %d Linear layers keep float32 (ATen's int4 layout wants output sizes in "
                    "sixteens and inputs in groups of %d): %s", len(kept), GROUP, ", ".join(kept[:5]))
    log.info("quantize=int4: %d Linear layers hold 4-bit weights in groups of %d (%s grid; %d of them stacked in "
             "%d matmuls that read one input) and the output head 8-bit rows, in %.1f s",
             packed, GROUP, "Q4_0's" if symmetric else "Q4_1's", len(stacked), len(groups),
             time.monotonic() - started)
    return len(targets) - len(kept)


def linear_layers(model) -> dict:
    """{name: Linear} that int4 and int8 replace: every nn.Linear, the output head included."""
    return {name: module for name, module in model.named_modules() if type(module) is nn.Linear}


def replace_module(model, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def release_freed_memory(model) -> None:
    """Let the server's RSS show the quantized model, not the float32 copy it was made from: the parameters
    left (embeddings, norms) are copied out of the checkpoint's memory map, which every one of them kept mapped
    whole, with the pages quantizing had read (513 MB of the default model's 540 MB file); and glibc is asked
    to give back the freed heap it keeps for reuse."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.device.type == "cpu":
                parameter.data = parameter.data.clone()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass
