"""Quantized bases through bitsandbytes: adapters on Linear4bit / Linear8bitLt, merges, LoftQ.

An adapter layer never needs the quantized bytes, only two operations on the base weight:
read it as floats (dequantize) and write floats back (requantize with the same settings).
:func:`dequantize_weight` / :func:`requantize_weight` do that for both bitsandbytes kinds,
so any method's layer can merge into a quantized base; :class:`QuantizedBaseMixin` plugs
them into the :class:`~peft_engine.tuners.base.AdapterLayer` protocol.

Merging rounds ``W + dW`` to the quantization grid again, so a merged model is close to the
unmerged one, not equal (as in HF PEFT). ``tests/test_quantization.py`` states the tolerance
relative to the adapter's effect: per layer the merged weight is within 1 % (int8), 12 % (NF4)
or 15 % (FP4) of ``W + dW`` relative to ``||dW||`` (the grids' own rounding error; measured
0.6 %, 9.8 %, 12.7 %), and the logits move by at most 10 % / 50 % / 60 % of
``||unmerged - base||`` (measured up to 3 %, 34 %, 40 %, for a random adapter ~4x the
size of the weights of the tiny test model).

``prepare_model_for_kbit_training`` freezes the base, upcasts the remaining half-precision
parameters to float32 for stable training, and turns on gradient checkpointing with input
gradients. ``loftq_init`` runs LoftQ on CPU or GPU: it alternates quantizing the residual
``W - s B A`` and fitting ``B A`` to the quantization error by SVD.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .tuners.lora.layer import Linear as LoraLinear

if TYPE_CHECKING:
    from .tuners.lora.config import LoraConfig
    from .tuners.lora.layer import LoraLayer


def is_bnb_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state")


def is_bnb_8bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear8bitLt"


def is_quantized(module: nn.Module) -> bool:
    return is_bnb_4bit(module) or is_bnb_8bit(module)


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float32 weight of a bitsandbytes layer (or a plain layer's weight).

    Two states bitsandbytes moves behind our back are handled: an 8-bit layer's row scales
    ``SCB`` live on the weight only until its first forward, which moves them to
    ``module.state`` (the weight then holds bare int8 values); and on CPUs with AVX512-BF16 a
    4-bit layer's first no-grad eval forward repacks the weight into a CPU-only layout that
    ``dequantize_4bit`` cannot read, so it is unpacked on a copy of the quant state first.
    """
    import bitsandbytes as bnb

    weight = module.weight
    if is_bnb_4bit(module):
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state).float()
    if is_bnb_8bit(module):
        if weight.dtype != torch.int8:  # not quantized yet (still float)
            return weight.data.float()
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise ValueError(f"{type(module).__name__} holds int8 weights but no row scales (SCB) on weight or state")
        return weight.data.float() * (scb.float()[:, None] / 127.0)  # row-wise absmax scaling
    return weight.data.float()


def requantize_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Store float ``weight`` into a bitsandbytes layer, quantized with the layer's own settings."""
    import bitsandbytes as bnb

    old = module.weight
    device = old.device
    if is_bnb_4bit(module):
        state = old.quant_state
        module.weight = bnb.nn.Params4bit(
            weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
            blocksize=state.blocksize, compress_statistics=old.compress_statistics, quant_type=state.quant_type,
            quant_storage=old.quant_storage, module=module,
        )._quantize(device) if device.type != "meta" else None
    elif is_bnb_8bit(module):
        module.weight = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float16).contiguous(), requires_grad=False,
                                          has_fp16_weights=False).to(device)
    else:
        module.weight.data = weight.to(module.weight.dtype)


class QuantizedBaseMixin:
    """Adapter-layer mixin: the base weight is read and written through (de)quantization."""

    base_layer: nn.Module

    def get_base_weight(self) -> torch.Tensor:
        return dequantize_weight(self.base_layer)

    def set_base_weight(self, weight: torch.Tensor) -> None:
        requantize_weight(self.base_layer, weight)


class QuantizedLoraLinear(QuantizedBaseMixin, LoraLinear):
    """LoRA / DoRA on a bitsandbytes Linear: the base runs its quantized matmul, the adapter in float."""

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        out = super().adapter_output(adapter_name, x, result.to(self.lora_A[adapter_name].weight.dtype))
        return out.to(result.dtype)


def create_quantized_lora_layer(target: nn.Module, adapter_name: str, config: LoraConfig,
                                module_name: str) -> QuantizedLoraLinear | None:
    """LoRA layer factory for bitsandbytes Linear4bit / Linear8bitLt bases."""
    if not is_quantized(target):
        return None
    layer = QuantizedLoraLinear(target)
    layer.update_layer(adapter_name, config, module_name)
    return layer


# ---- training a quantized base --------------------------------------------------------------
def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Freeze the base, upcast non-quantized half-precision parameters, enable checkpointing."""
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and param.__class__.__name__ not in ("Params4bit", "Int8Params"):
            param.data = param.data.float()
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # so checkpointed blocks see a tensor that needs grad
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        # transformers >= 5.x renamed it (the old name still works but warns on every call).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


# ---- LoftQ -------------------------------------------------------------------------------------
def _fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequant(quant(weight))``: NF4 (bitsandbytes) for 4 bits, per-row absmax for 8 and 2 bits."""
    if bits == 4:
        import bitsandbytes as bnb

        packed, state = bnb.functional.quantize_4bit(weight.float().contiguous().cpu(), quant_type="nf4", blocksize=64)
        return bnb.functional.dequantize_4bit(packed, state).to(weight.device)
    levels = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
    return (weight / scale).round().clamp(-levels - 1, levels) * scale


@torch.no_grad()
def loftq_decompose(weight: torch.Tensor, r: int, scaling: float, bits: int = 4, iters: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, A, B) with ``Q`` on the quantization grid and ``Q + s B A ~ W`` (LoftQ, Li et al. 2023)."""
    weight = weight.float()
    a = torch.zeros(r, weight.shape[1], device=weight.device)
    b = torch.zeros(weight.shape[0], r, device=weight.device)
    q = weight
    for _ in range(max(1, iters)):
        q = _fake_quantize(weight - scaling * (b @ a), bits)
        u, s, vh = torch.linalg.svd(weight - q, full_matrices=False)
        root = (s[:r] / scaling).sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
    return q, a, b


def loftq_init(layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
    """``init_lora_weights="loftq"``: replace the base by its quantized residual and start A, B on the error."""
    if adapter_name not in layer.lora_A or layer.dense_base_weight().dim() != 2:
        raise ValueError("init_lora_weights='loftq' supports Linear and Conv1D layers only")
    loftq = config.loftq_config or {}
    q, a, b = loftq_decompose(layer.dense_base_weight(), layer.r[adapter_name], layer.scaling[adapter_name],
                              bits=loftq.get("loftq_bits", 4), iters=loftq.get("loftq_iter", 1))
    layer.lora_A[adapter_name].weight.data = a.contiguous()
    layer.lora_B[adapter_name].weight.data = b.contiguous()
    layer.set_base_weight(layer.from_dense(q))


def quantization_error(original: torch.Tensor, approximation: torch.Tensor) -> float:
    """Relative Frobenius error, the figure LoftQ improves."""
    return float(torch.linalg.norm(original.float() - approximation.float()) / max(math.sqrt(original.numel()), 1.0))
