"""Quantized twins of ``nn.Conv1d/2d/3d`` (with optional BatchNorm folding) and ``nn.ConvTranspose2d``.

BatchNorm folding for QAT (Jacob et al. 2018, §3.2; torch.ao's ``ConvBn``): when a BatchNorm
directly follows a convolution, the twin takes the BatchNorm in as ``bn`` and quantizes the
*folded* weight, the weight the deployed model will hold. With ``γ, β, μ, σ² , ε`` the BN's
parameters and running statistics::

    f      = γ / sqrt(σ² + ε)                  # per output channel
    W_fold = W · f                             # what the weight quantizer observes and rounds
    y      = BN(conv(x, Q(W_fold)) / f + b)    # training: BN still normalises with batch statistics

Dividing by ``f`` undoes the scaling, so the BatchNorm keeps learning its statistics while the
convolution already runs with quantized folded weights. Once the statistics are frozen
(:meth:`QuantConvNd.freeze_bn_stats`, or in eval mode) the BN uses its running statistics and the
layer equals a plain convolution with weight ``Q(W_fold)`` and bias ``β + (b - μ) · f``, which is
what :meth:`~qat.modules.base.QuantizedLayer.to_float` and the exporter produce. A timm
``BatchNormAct2d`` folds the same way; its dropout and activation still run after the BatchNorm.

With an int32 bias (:mod:`qat.core.bias`) the device adds ``Qb(B)``, the folded bias ``B`` on its
int32 grid, not ``B``. Once the BatchNorm uses its running statistics (frozen, or in eval mode),
the training form adds the difference ``(Qb(B) − B) / f`` before the BatchNorm, which makes it
exactly the deployed output; the difference has no gradient for ``B`` (straight through) and the
fake quantization's gradient for the bias grid. While the BatchNorm normalises with batch
statistics it would subtract the batch mean and the constant would cancel (as a convolution's own
bias does there), so it is not added.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.core.fake_quant import export_face
from qat.core.snapshot import snapshot
from qat.core.spec import Granularity
from qat.modules.base import QUANT_CHILDREN, QuantizedLayer

# the BatchNorm each convolution folds: what the twin takes in as ``bn`` and what qat.preparation.bn_fold looks for
FOLDABLE = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def bn_tail(module: nn.Module) -> list[nn.Module] | None:
    """What a foldable BatchNorm does after normalising: ``[]`` for torch's BatchNorm1d/2d/3d,
    ``[drop, act]`` for timm's ``BatchNormAct2d`` family (BatchNorm → dropout → activation); None
    for anything else, which is not folded."""
    if type(module) in FOLDABLE.values():
        return []
    is_bn_act = isinstance(module, tuple(FOLDABLE.values())) and type(module).__name__.startswith("BatchNormAct")
    if is_bn_act and isinstance(getattr(module, "drop", None), nn.Module) and isinstance(getattr(module, "act", None), nn.Module):
        return [module.drop, module.act]
    return None


class DivideChannels(torch.autograd.Function):
    """``y / f`` for a per-channel ``f``, saving the quotient instead of ``y``.

    The BatchNorm after the folded convolution saves the quotient (its input) anyway, so this
    division adds nothing to the saved activations; plain ``y / f`` would keep the convolution's
    output too, one more activation-sized tensor per layer. ``d(y/f)/df = -(y/f) / f``."""

    @staticmethod
    def forward(ctx, y: Tensor, factor: Tensor) -> Tensor:
        quotient = y / factor
        ctx.save_for_backward(quotient, factor)
        return quotient

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        quotient, factor = ctx.saved_tensors
        grad_y = grad / factor if ctx.needs_input_grad[0] else None
        grad_factor = None
        if ctx.needs_input_grad[1]:
            grad_factor = -(grad * quotient).sum_to_size(factor.shape) / factor
        return grad_y, grad_factor


class QuantConvNd(QuantizedLayer):
    """Shared forward of the Conv1d/2d/3d twins, with BatchNorm folding."""

    bn: nn.modules.batchnorm._BatchNorm | None

    @classmethod
    def from_float(cls, layer, weight, activation, int32_bias=False):
        twin = super().from_float(layer, weight, activation, int32_bias)
        twin.register_module("bn", None)
        twin.bn_frozen = False
        return twin

    def attach_bn(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        """Fold ``bn`` (which must directly follow this convolution) into this layer."""
        self.bn = bn

    def freeze_bn_stats(self, frozen: bool = True) -> None:
        """Stop (or restart) updating the folded BatchNorm's statistics: a frozen BatchNorm stays
        in eval mode (running statistics) even while the model trains."""
        self.bn_frozen = frozen
        if self.bn is not None:
            self.bn.train(self.training and not frozen)

    def train(self, mode: bool = True) -> QuantConvNd:
        super().train(mode)
        if self.bn is not None and self.bn_frozen:
            self.bn.train(False)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"bn_frozen": self.bn_frozen}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, Mapping):
            return  # a loader's placeholder for "no extra state here" (Quantizer.set_extra_state)
        self.freeze_bn_stats(bool(state.get("bn_frozen", False)))

    def _bn_factor(self) -> Tensor:
        """``f = γ / sqrt(σ² + ε)`` per output channel (``γ = 1`` without affine parameters).

        ``running_var`` is updated in place later in the same forward, hence the snapshot."""
        bn = self.bn
        factor = snapshot(torch.rsqrt(bn.running_var + bn.eps))
        return factor * bn.weight if bn.weight is not None else factor

    def _channel_shape(self, ndim: int, axis: int) -> list[int]:
        shape = [1] * ndim
        shape[axis] = -1
        return shape

    def float_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        if self.bn is None:
            return self.weight, self.bias
        factor = self._bn_factor()
        bias = self.bias if self.bias is not None else torch.zeros_like(self.bn.running_mean)
        folded_bias = (bias - snapshot(self.bn.running_mean)) * factor
        if self.bn.bias is not None:
            folded_bias = folded_bias + self.bn.bias
        return self.weight * factor.reshape(self._channel_shape(self.weight.ndim, 0)), folded_bias

    def forward(self, input: Tensor) -> Tensor:
        x = self.quantize_input(input)
        if self.bn is None:
            weight = self.quantize_weight(self.weight)
            with self.recomputing(input, x, weight):
                return self._conv_forward(x, weight, self.quantize_bias(self.bias))
        if export_face() and not self.training:
            # what a device runs: one convolution with the folded, quantized weight and folded bias
            # (equal to the training form below in eval mode, up to float rounding)
            weight, bias = self.float_weight_bias()
            y = self._conv_forward(x, self.quantize_weight(weight), self.quantize_bias(bias))
            for tail in bn_tail(self.bn) or []:
                y = tail(y)
            return y
        factor = self._bn_factor()
        # A channel with γ = 0 (zero-init residual BatchNorms) would divide 0 by 0 below. Folding
        # it with 1 instead is exact (the BatchNorm's own γ = 0 still zeroes its output) and keeps
        # γ's gradient (folding with 0 would zero the normalised input and freeze γ at 0).
        factor = torch.where(factor == 0, torch.ones_like(factor), factor)
        weight_factor = factor.reshape(self._channel_shape(self.weight.ndim, 0))
        weight = self.quantize_weight(self.weight, weight_factor)
        with self.recomputing(input, x, weight, weight_factor):
            y = self._conv_forward(x, weight, None)
        # In the convolution's output dtype (bf16 under autocast), as autocast runs a float
        # conv's bias: a float32 factor would promote every activation after it to float32 and
        # double the memory the backward pass saves. Rounding f costs nothing in training, where
        # the BatchNorm's batch statistics cancel any per-channel scale.
        y = DivideChannels.apply(y, factor.to(y.dtype).reshape(self._channel_shape(x.ndim, 1)))
        bias = self.bias
        # with batch statistics the BatchNorm subtracts the batch mean, and a constant added here would only cancel
        if not self.bn.training and (rounding := self._bias_rounding()) is not None:
            rounding = rounding / factor  # the BatchNorm multiplies by f again (running statistics)
            bias = rounding if bias is None else bias + rounding
        if bias is not None:
            y = y + bias.to(y.dtype).reshape(self._channel_shape(x.ndim, 1))
        return self.bn(y)  # the module, so a BatchNorm-with-activation runs its activation too

    def _bias_rounding(self) -> Tensor | None:
        """``Qb(B) − B`` for the folded bias ``B`` (from the running statistics), or None when the
        bias is not fake-quantized: what the int32 bias adds to the deployed output, per channel."""
        if self.bias_quantizer is None:
            return None
        bias = self.float_weight_bias()[1]
        rounded = self.quantize_bias(bias)
        return None if rounded is bias else rounded - bias

    def to_float(self) -> nn.Module:
        conv = super().to_float()
        tail = bn_tail(self.bn) if self.bn is not None else []
        return nn.Sequential(conv, *tail) if tail else conv

    def twin_children(self) -> tuple[str, ...]:
        return (*QUANT_CHILDREN, "bn")

    def twin_attributes(self) -> tuple[str, ...]:
        return ("bn_frozen",)


class QuantConv1d(QuantConvNd, nn.Conv1d):
    """``nn.Conv1d`` twin (grouped and depthwise included)."""

    float_cls = nn.Conv1d


class QuantConv2d(QuantConvNd, nn.Conv2d):
    """``nn.Conv2d`` twin (grouped and depthwise included)."""

    float_cls = nn.Conv2d


class QuantConv3d(QuantConvNd, nn.Conv3d):
    """``nn.Conv3d`` twin (grouped and depthwise included)."""

    float_cls = nn.Conv3d


class QuantConvTranspose2d(QuantizedLayer, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` twin. Its weight is ``(in, out / groups, kh, kw)``: per-channel
    scales run along axis 1, per-group blocks along axis 0."""

    float_cls = nn.ConvTranspose2d
    channel_axis = 1
    input_axis = 0

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        x, weight = self.quantize_input(input), self.quantize_weight(self.weight)
        with self.recomputing(input, x, weight):
            return F.conv_transpose2d(x, weight, self.quantize_bias(self.bias), self.stride, self.padding, output_padding,
                                      self.groups, self.dilation)

    def bias_channels_align(self) -> bool:
        # the weight holds out / groups channels: per-channel scales cover one group's outputs
        q = self.weight_quantizer
        return self.groups == 1 or (q is not None and q.spec.granularity is Granularity.PER_TENSOR)
