"""``--quantize int8``: int8 Linear weights on a CPU (no Jina here; model.py calls it after loading).
``--quantize auto`` (the default) chooses at start-up and says why (``choose_quantize``): int4 (int4.py) for a
GGUF file of 4-bit blocks on a CPU, which keeps the file's own weights; else the model as loaded (int8 changes a
float32 model's weights, so a user asks for it).

Every ``nn.Linear`` of the model but the output head becomes ``Int8Linear`` (the head: below): its weight is int8 with one
scale per output channel, and each forward pass quantizes its input per token (one scale per row) and runs
fbgemm's int8 matmul (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``). Three things keep the quality that
``torch.ao.quantization.quantize_dynamic`` loses (its perplexity on the default model was 1.7x-3x fp32's):

- SmoothQuant (Xiao et al., 2022): a few input channels carry activations much larger than the rest, so
  one 8-bit scale per row rounds every other channel to a few levels. Each Linear divides its input by a
  per-channel factor ``s = max|x|^0.5 / max|W|^0.5`` and multiplies its weight columns by ``s`` (the same
  product), measured once at load on a fixed calibration text (``CALIBRATION_TEXT``, a chat turn included).
- The scale is per token, not shared by the whole prompt: each row is divided by its own largest value first
  (a whole-prompt scale is what made prefill, and so the first answer token, suffer), then quantized on one
  fixed grid (-1..1 in 255 levels, or 127 with ``reduce_range``), never one that fbgemm fits to the batch's
  min and max: a row computes the same integers alone, in a batch, or as a verify step's position, so
  speculation and batching leave int8's greedy answers as they are (the fp32 work around the integers
  still rounds by its shapes, as in float32).
- No product pair saturates. Without VNNI (AVX2 alone: AMD EPYC before Zen 4, older Intel parts) fbgemm adds
  each pair of uint8 x int8 products in 16 bits, which saturates at full scale (255 x 127 x 2 > 32767): on
  such a CPU 8-bit weights and 8-bit inputs put the default model's perplexity at +4.4%. So a layer gives
  15 bits to the pair: body layers 7-bit weights (+-63) and 8-bit inputs (their inputs have the outliers);
  ``HEAD_GRID``, 8-bit weights and 7-bit inputs (``reduce_range``), is the other split. ``Int8Linear`` checks
  that bound on its stored weights (``widest_pair_sum``), so no CPU can saturate.
- The output head keeps 8-bit weights, one scale per row, and unquantized (bfloat16) inputs
  (``int4.Int8RowsLinear``): on HEAD_GRID its 7-bit inputs drew "L'Étoile" for the capital of France on an
  AVX2 CPU (+1.0% perplexity); weight-only, the default model is at +0.5% and answers "Paris".

Every x86 CPU then computes the same integers (tests/unit/test_quantize.py compares each layer with an exact
integer reference, on this CPU's kernels and on fbgemm's AVX2 kernels forced by ``FBGEMM_ENABLE_INSTRUCTIONS``).
The fp32 work around them is not the same everywhere (ATen's AVX2 and AVX-512 kernels round differently in the
last bit), and an ulp moved across a rounding boundary of an 8-bit grid changes the quantization noise from
that layer on: two CPUs give two draws of the same noise. The README ("int8 weights") gives the spread.

Measured on the default model: perplexity +1.6% to +3.2% against fp32 (by text and draw), "Paris" kept.
CUDA devices are refused: bf16/fp16 are the GPU path.
"""

import logging
import time
import warnings

import torch
from torch import nn

from .int4 import (Int8RowsLinear, SharedInput, SharedInputSlice, WeightOnlyLinear, inputs_read, linear_layers,
                   release_freed_memory, replace_module, shared_input_groups, stacked_linear)

log = logging.getLogger("jina_llm_stream.quantize")

QUANTIZE_MODES = ("auto", "none", "int8", "int4")
DEFAULT_QUANTIZE = "auto"
SMOOTHING_ALPHA = 0.5  # SmoothQuant's migration strength: 0 keeps the activations as they are, 1 flattens them

# Calibration only sets the smoothing factors (the largest |activation| per input channel); any varied text
# does. Kept apart from what tests/unit/test_quantize.py evaluates on (tests/data/held_out.md).
CALIBRATION_TEXT = """The history of the city begins with a small settlement on the river, where traders met to exchange
grain, salt and cloth. Over the centuries it grew into a capital with wide avenues, museums and a famous
cathedral. Today about two million people live there, and visitors come from all over the world.
Photosynthesis is the process by which green plants turn light, water and carbon dioxide into sugar and
oxygen. It takes place in the chloroplasts, which contain chlorophyll.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
Question: What is the largest planet in the solar system? Answer: Jupiter is the largest planet; it is a gas
giant more than eleven times as wide as the Earth. Please write a short, friendly email inviting a colleague
to lunch next Tuesday at noon, and mention that the new restaurant near the station has vegetarian dishes."""
CALIBRATION_CHAT = [
    {"role": "user", "content": "Explain in two sentences why the sky is blue."},
    {"role": "assistant", "content": "Sunlight is scattered by the molecules of the air, and blue light, with its "
                                     "short wavelength, is scattered the most. So the sky looks blue from every "
                                     "direction."},
]


def choose_quantize(model, dtype: str, gguf_grid: bool | None = None) -> tuple:
    """quantize=auto: ('int4' or 'none', why), from where and how the model was loaded. ``gguf_grid``: the model
    came from a GGUF file of Q4_0 (True) or Q4_1 (False) blocks (int4.exact_gguf_grid), which int4 keeps as they
    are, as llama.cpp and Ollama run such a file (the default model: one stream 2-3.4x its float32 copy,
    perplexity within 0.1%). Everything else stays as loaded: int8 would change a float32 model's weights
    (perplexity +0.5-3%), and float32 keeps greedy answers equal to ``model.generate`` on every CPU."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu":
        return "none", f"the model runs on {parameter.device.type} (int4 is for CPUs; there --dtype picks the precision)"
    if dtype != "auto" or parameter.dtype != torch.float32:
        return "none", f"the model is {str(parameter.dtype).removeprefix('torch.')}" + \
            (f" as --dtype {dtype} asked" if dtype != "auto" else " in its checkpoint") + " (int4 replaces float32 only)"
    if gguf_grid is None:
        return "none", ("not a GGUF file of Q4_0/Q4_1 blocks: float32 as loaded (--quantize int8 or int4 trade "
                        "some perplexity for speed: README \"int8 weights\", \"4-bit weights\")")
    return "int4", (f"the GGUF file holds {'Q4_0' if gguf_grid else 'Q4_1'} blocks: int4 keeps them packed "
                    "(about 7x fewer bytes per weight than float32, the same weights; --quantize none keeps float32)")


def has_x86_int8_kernels() -> bool:
    return bool({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines))


def check_quantize(quantize: str, device_type: str | None = None) -> None:
    """ValueError (one line) for a value other than QUANTIZE_MODES, and for int8 or int4 on a CUDA device."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not allowed: use one of {', '.join(QUANTIZE_MODES)}")
    if quantize in ("int8", "int4") and device_type == "cuda":
        raise ValueError(f"quantize={quantize} is for CPUs (ATen's and fbgemm's CPU kernels): on a CUDA device use "
                         "--dtype bfloat16 or float16 (or --device cpu)")


def row_absmax(rows: torch.Tensor) -> torch.Tensor:
    """Each row's largest |x| ([rows, 1]). Two plain reductions: ``linalg.vector_norm(ord=inf)`` gives the same
    values but ran 12-15x slower on a prompt's rows (720 x 576: 0.67 ms vs 0.05 ms), which made int8 prefill
    and verify steps (many rows) spend a quarter of their time here."""
    return rows.amax(dim=1, keepdim=True).maximum(rows.amin(dim=1, keepdim=True).neg())


# The two ways to give a product pair 15 bits (see the module's text): the largest |weight| and whether
# the input keeps 7 bits (fbgemm's reduce_range) instead of 8.
BODY_GRID = (63, False)
HEAD_GRID = (127, True)
PAIR_SUM_LIMIT = 32767  # fbgemm's AVX2 path (vpmaddubsw) adds two uint8 x int8 products in a saturating int16


def widest_pair_sum(int_weight: torch.Tensor, reduce_range: bool) -> int:
    """The largest |a0*w0 + a1*w1| fbgemm's AVX2 path can meet with these weights ([out, in] integers): inputs
    are uint8 (0..255, or 0..127 with reduce_range) and the pairs are neighbouring input channels."""
    input_max = 127 if reduce_range else 255
    magnitudes = int_weight.to(torch.int32).abs()
    if magnitudes.shape[1] % 2:
        magnitudes = torch.nn.functional.pad(magnitudes, (0, 1))
    return int(magnitudes.reshape(magnitudes.shape[0], -1, 2).sum(dim=2).max()) * input_max


class Int8Linear(nn.Module):
    """A Linear with an int8 weight (one scale per output channel), its input quantized per token at run
    time, and the SmoothQuant factors of its input channels (``act_absmax``: the calibration's max |x|).
    ``grid``: BODY_GRID or HEAD_GRID."""

    def __init__(self, linear: nn.Linear, act_absmax: torch.Tensor | None = None, alpha: float = SMOOTHING_ALPHA,
                 grid: tuple = BODY_GRID):
        super().__init__()
        self.weight_levels, self.reduce_range = grid
        weight = linear.weight.detach().float()
        smooth = None
        if act_absmax is not None:
            factors = (act_absmax.float().clamp(min=1e-5) ** alpha
                       / weight.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha))
            weight = weight * factors
            smooth = 1 / factors
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / self.weight_levels
        with warnings.catch_warnings():  # torch 2.13 announces the quantized tensor types' removal (see README)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch.quantize_per_channel(weight, scale.double(),
                                                 torch.zeros(weight.shape[0], dtype=torch.long), 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.register_buffer("smooth", smooth)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        widest = widest_pair_sum(qweight.int_repr(), self.reduce_range)
        if widest > PAIR_SUM_LIMIT:  # a CPU without VNNI would saturate: a grid no CPU may compute differently
            raise ValueError(f"int8 grid {grid} lets a product pair reach {widest} > {PAIR_SUM_LIMIT}")

    @property
    def input_scale(self) -> float:
        """Each row is divided by its own largest |x| and put on one fixed symmetric grid, whatever else is in the
        batch: a row's integers do not depend on its neighbours (nor a position on the step's width)."""
        return 2.0 / (self._input_levels - 1)

    @property
    def input_zero_point(self) -> int:
        return (self._input_levels - 1) // 2

    @property
    def _input_levels(self) -> int:
        return 127 if self.reduce_range else 255

    def int8_weight(self) -> torch.Tensor:
        """The stored int8 weight ([out, in], smoothing factors included)."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        rows = x.reshape(-1, shape[-1]).float()
        if self.smooth is not None:
            rows = rows * self.smooth
        peak = row_absmax(rows).clamp_(min=1e-12)
        out = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            rows / peak, self.input_scale, self.input_zero_point, self._packed).mul_(peak)
        return out.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 "
                f"(weights +-{self.weight_levels}, inputs {7 if self.reduce_range else 8} bits)")


class SharedInputInt8(SharedInput):
    """int8's stack of layers that read one input (``int4.SharedInput``): the input is smoothed and quantized
    once for all of them. The SmoothQuant factors are the stack's (the input's max |x| is the same for every
    member); each output channel keeps its own weight scale."""

    def __init__(self, linears: list, act_absmax: torch.Tensor | None):
        super().__init__(Int8Linear(stacked_linear(linears), act_absmax, grid=BODY_GRID),
                         [linear.out_features for linear in linears])


def calibration_ids(tokenizer) -> list:
    """Token id lists the calibration runs: the plain text, and a chat turn through the model's template."""
    ids = [tokenizer(CALIBRATION_TEXT)["input_ids"]]
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template(CALIBRATION_CHAT, tokenize=False)
        ids.append(tokenizer(chat, add_special_tokens=False)["input_ids"])
    return ids


def calibrate(model, modules: dict, ids_list: list) -> tuple:
    """What each of ``modules`` ({name: Linear}) read over ``ids_list``: {name: its largest |input| per channel},
    and the groups of names that read the very same input tensor in every pass (siblings to stack)."""
    peaks = {}
    inputs_by_pass = inputs_read(model, modules, ids_list, peaks)
    return peaks, shared_input_groups(inputs_by_pass)


def quantize_int8(model, tokenizer) -> int:
    """Replace the model's Linear layers by Int8Linear (the head by int4.Int8RowsLinear), in place; the number replaced.
    ValueError when this torch has no x86 int8 kernels or the model has no nn.Linear to replace."""
    if not has_x86_int8_kernels():
        raise ValueError("quantize=int8 needs torch's x86 int8 kernels (fbgemm), which this CPU build lacks")
    started = time.monotonic()
    targets = linear_layers(model)
    if not targets:
        raise ValueError(f"quantize=int8: {type(model).__name__} has no nn.Linear layers to quantize")
    absmax, groups = calibrate(model, targets, calibration_ids(tokenizer))
    head = model.get_output_embeddings()
    groups = [group for group in groups if all(targets[name] is not head for name in group)]
    for group in groups:
        stack = SharedInputInt8([targets[name] for name in group], absmax.get(group[0]))
        for member, name in enumerate(group):
            replace_module(model, name, SharedInputSlice(stack, member))
    stacked = {name for group in groups for name in group}
    for name, linear in targets.items():
        if linear is head:
            replace_module(model, name, Int8RowsLinear(linear))
        elif name not in stacked:
            replace_module(model, name, Int8Linear(linear, absmax.get(name)))
    release_freed_memory(model)
    log.info("quantize=int8: %d Linear layers hold int8 weights (the output head included; %d of them stacked in "
             "%d matmuls that read one input), in %.1f s", len(targets), len(stacked), len(groups),
             time.monotonic() - started)
    return len(targets)


def thread_count_invariant(model) -> bool:
    """True when the model was quantized here and no float matmul weight is left (an embedding's table is
    looked up, not multiplied): the 4- and 8-bit kernels split a product by its outputs, never a sum, so its
    logits are the same at any thread count (step_threads.py chooses the count by speed alone)."""
    quantized = any(isinstance(module, (Int8Linear, WeightOnlyLinear)) for module in model.modules())
    tables = {id(parameter) for module in model.modules() if isinstance(module, nn.Embedding)
              for parameter in module.parameters()}
    return quantized and all(parameter.dim() < 2 or id(parameter) in tables for parameter in model.parameters())
