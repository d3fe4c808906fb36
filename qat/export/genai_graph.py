"""The decoder graph onnxruntime-genai runs: a Llama-family model with a key-value cache.

The graph is written node by node from the model's modules, in the form onnxruntime-genai's own
model builder gives (ONNX Runtime's fused CPU kernels), so the runtime's generation loop drives it
the same way:

- inputs ``input_ids`` ``(batch, sequence)``, ``attention_mask`` ``(batch, total)`` and, per layer,
  ``past_key_values.{i}.key/value`` ``(batch, kv_heads, past, head_size)``; outputs ``logits`` and
  ``present.{i}.key/value`` ``(batch, kv_heads, total, head_size)``; every size free;
- token embedding: ``Gather``, or ``GatherBlockQuantized`` for a quantized table;
- RMSNorm: ``SimplifiedLayerNormalization``, and ``SkipSimplifiedLayerNormalization`` where a
  residual sum comes first;
- attention: ``GroupQueryAttention`` with rotary embedding inside (cos/sin tables from the model's
  own rotary module, up to the context length), fed by one fused q/k/v projection when the three
  projections are stored alike;
- Linear: ``MatMulNBits`` for a quantized weight, in the quantizer's own codes and scales
  (:mod:`qat.export.nbits`), ``MatMul`` for a float one; SwiGLU as ``x * Sigmoid(x) * up``.

MatMulNBits computes in float32 on de-quantized weights (``accuracy_level`` 0), or, for a layer
whose input quantizer is symmetric int8 per-token blocks of the weight's block size, quantizes its
input exactly so and multiplies in int8 (``accuracy_level`` 4: ONNX Runtime's fast path on CPUs).
Either way the graph computes the numbers the model was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qat.errors import QATError
from qat.export.nbits import BlockedWeight, block_size_for, blocked_weight, concatenate
from qat.modules.base import QuantizedLayer

SUPPORTED = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
"""Hugging Face ``model_type`` → onnxruntime-genai's model ``type``."""
MS = "com.microsoft"
OPSET = 21
INT8_COMPUTE, FLOAT_COMPUTE = 4, 0
"""MatMulNBits ``accuracy_level``: int8 products on quantized inputs, or float32 ones."""


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal language model in ``model`` (itself, or a submodule: a
    LightningModule's), checked to be of a supported family."""
    candidates = [m for m in model.modules() if hasattr(m, "config") and hasattr(m, "lm_head")]
    # the one that holds the decoder layers, not a wrapper that forwards config and lm_head to it (peft's)
    found = next((m for m in candidates if hasattr(getattr(m, "model", None), "layers")), candidates[0] if candidates else None)
    if found is None:
        raise QATError(f"export_genai needs a Hugging Face causal language model (…ForCausalLM); found none in {type(model).__name__}")
    model_type = getattr(found.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise QATError(f"export_genai: model type `{model_type}` ({type(found).__name__}) is not supported; "
                       f"supported: {', '.join(SUPPORTED)}")
    if not hasattr(getattr(found, "model", None), "layers"):
        raise QATError(f"export_genai: {type(found).__name__} has no `model.layers`, the Llama family's decoder layers")
    return found


def _quantized_weight(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLayer) and module.weight_quantizer is not None and module.weight_quantizer.fake_quant_enabled


def activation_block(layer: str, module: nn.Module) -> int | None:
    """The block size of a Linear's input quantization as MatMulNBits does it (symmetric int8,
    ``amax / 127`` per block of the last dimension), None when the input is not quantized;
    QATError naming the layer for any other input format."""
    quantizer = getattr(module, "input_quantizer", None)
    if quantizer is None or not quantizer.fake_quant_enabled:
        return None
    spec = quantizer.spec
    if not (spec.dynamic and spec.bits == 8 and spec.signed and spec.symmetric and spec.narrow_range and spec.group_size):
        raise QATError(
            f"layer `{layer}`: MatMulNBits quantizes its input only as symmetric int8 blocks of the weight's block size; "
            f"quantize the input with `{{bits: 8, signed: true, symmetric: true, narrow_range: true, granularity: per_token, "
            f"group_size: 32}}` or not at all (this layer's input: {spec.describe()})")
    return spec.group_size


@dataclass
class _Projection:
    """One Linear's stored form: a blocked weight and its accuracy level, or a float ``(K, N)`` matrix."""

    name: str
    blocked: BlockedWeight | None
    accuracy_level: int
    matrix: np.ndarray | None
    bias: np.ndarray | None

    def kind(self) -> tuple[Any, ...]:
        if self.blocked is None:
            return ("float", self.bias is None)
        return ("nbits", self.blocked.bits, self.blocked.block_size, self.accuracy_level, self.bias is None)


def _same_blocks(a: BlockedWeight, b: BlockedWeight | None) -> bool:
    """Whether two blocked weights hold the same codes, scales and zero points in the same layout."""
    if b is None or (a.bits, a.block_size) != (b.bits, b.block_size):
        return False
    zeros_equal = (a.zero_points is None) == (b.zero_points is None) and (
        a.zero_points is None or np.array_equal(a.zero_points, b.zero_points))
    return zeros_equal and np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


@dataclass
class _Graph:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attrs: Any) -> list[str]:
        names = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        return names


class DecoderGraph:
    """Builds the ONNX decoder of :func:`causal_lm`'s model (see the module docstring).

    Args:
        lm: the causal LM (prepared or float), in eval mode.
        names: module → its path in the model the user passed, for error messages and the sidecar.
        context_length: the longest sequence the cos/sin tables cover.
    """

    def __init__(self, lm: nn.Module, names: dict[nn.Module, str], context_length: int) -> None:
        self.lm, self.config, self.names, self.context_length = lm, lm.config, names, context_length
        self.g = _Graph()
        self._tied_head: tuple[_Projection, list[str]] | None = None
        """The head's projection and the embedding's stored codes, scales and zero points, when the head shares them."""
        self.layers: dict[str, dict[str, Any]] = {}
        """Per stored Linear or embedding: op, bits, block size, accuracy level, initializer names."""
        config = self.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.hidden = config.hidden_size
        self.head_size = getattr(config, "head_dim", None) or self.hidden // self.heads
        if self.head_size % 16:
            raise QATError(f"export_genai: head size {self.head_size}: ONNX Runtime's GroupQueryAttention takes multiples of 16 "
                           "on the CPU")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise QATError(f"export_genai: activation `{config.hidden_act}` is not supported (Llama-family MLPs use silu)")

    def name(self, module: nn.Module) -> str:
        return self.names.get(module, type(module).__name__)

    # -- weights ---------------------------------------------------------------------------------

    def projection(self, module: nn.Module) -> _Projection:
        name = self.name(module)
        # a quantized layer's own float weight and bias: a LoRA layer's merged weight (qat.modules.lora)
        weight, bias = module.float_weight_bias() if isinstance(module, QuantizedLayer) else (module.weight, module.bias)
        bias = None if bias is None else _numpy(bias)
        if not _quantized_weight(module):
            if getattr(module, "input_quantizer", None) is not None and module.input_quantizer.fake_quant_enabled:
                raise QATError(f"layer `{name}`: a float weight with a quantized input has no ONNX Runtime kernel in this graph; "
                               "quantize its weight too, or leave its input float")
            return _Projection(name, None, FLOAT_COMPUTE, _numpy(weight).T.copy(), bias)
        act = activation_block(name, module)
        block = block_size_for(name, module.weight_quantizer, weight.shape[1], act)
        blocked = blocked_weight(name, weight, module.weight_quantizer, block)
        return _Projection(name, blocked, FLOAT_COMPUTE if act is None else INT8_COMPUTE, None, bias)

    def _store_blocked(self, prefix: str, blocked: BlockedWeight) -> list[str]:
        """Initializer names of ``blocked``'s codes, scales and zero points ("" when default)."""
        names = [self.g.constant(f"{prefix}.codes", blocked.codes), self.g.constant(f"{prefix}.scales", blocked.scales)]
        return [*names, self.g.constant(f"{prefix}.zero_points", blocked.zero_points) if blocked.zero_points is not None else ""]

    def matmul(self, x: str, projections: list[_Projection], prefix: str, stored: list[str] | None = None) -> str:
        """``x @ W (+ b)`` for one projection or several stored alike (concatenated along N);
        ``stored``: the initializers that already hold the blocked weight (a tied embedding's)."""
        first = projections[0]
        bias = None if first.bias is None else np.concatenate([p.bias for p in projections]).astype(np.float32)
        if first.blocked is not None:
            blocked = concatenate([p.blocked for p in projections]) if len(projections) > 1 else first.blocked
            codes, scales, zero_points = stored or self._store_blocked(prefix, blocked)
            inputs = [x, codes, scales, zero_points]
            if bias is not None:
                inputs += ["", self.g.constant(f"{prefix}.bias", bias)]
            while inputs[-1] == "":
                inputs.pop()
            (y,) = self.g.node("MatMulNBits", inputs, f"{prefix}/MatMulNBits", domain=MS, K=blocked.k, N=int(blocked.scales.shape[0]),
                               bits=blocked.bits, block_size=blocked.block_size, accuracy_level=first.accuracy_level)
            for p in projections:
                self.layers[p.name] = {"op": "MatMulNBits", "node": f"{prefix}/MatMulNBits", "bits": blocked.bits,
                                       "block_size": blocked.block_size, "accuracy_level": first.accuracy_level,
                                       "codes": codes, "scales": scales, "zero_points": zero_points or None}
        else:
            matrix = np.concatenate([p.matrix for p in projections], axis=1) if len(projections) > 1 else first.matrix
            (y,) = self.g.node("MatMul", [x, self.g.constant(f"{prefix}.weight", matrix.astype(np.float32))], f"{prefix}/MatMul")
            if bias is not None:
                (y,) = self.g.node("Add", [y, self.g.constant(f"{prefix}.bias", bias)], f"{prefix}/Add")
            for p in projections:
                self.layers[p.name] = {"op": "MatMul", "node": f"{prefix}/MatMul"}
        return y

    def linears(self, x: str, modules: list[nn.Module], prefixes: list[str], fused_prefix: str) -> list[str]:
        """Each module's output, or one fused output when all are stored alike."""
        projections = [self.projection(m) for m in modules]
        if len({p.kind() for p in projections}) == 1:
            return [self.matmul(x, projections, fused_prefix)]
        return [self.matmul(x, [p], prefix) for p, prefix in zip(projections, prefixes, strict=True)]

    def embedding(self, module: nn.Module, head: nn.Module) -> str:
        """The token embedding of ``input_ids``: Gather, or GatherBlockQuantized sharing the head's
        stored weight when the table is tied to it and quantized alike."""
        name = self.name(module)
        if not _quantized_weight(module):
            table = self.g.constant("model.embed_tokens.weight", _numpy(module.weight))
            (y,) = self.g.node("Gather", [table, "input_ids"], "/model/embed_tokens/Gather")
            self.layers[name] = {"op": "Gather", "node": "/model/embed_tokens/Gather"}
            return y
        head_projection = self.projection(head) if head.weight is module.weight and _quantized_weight(head) else None
        if head_projection is not None and head.weight_quantizer is module.weight_quantizer:
            block = head_projection.blocked.block_size  # the head's blocks (its input's): one table serves both
        else:
            block = block_size_for(name, module.weight_quantizer, module.weight.shape[1], None)
        blocked = blocked_weight(name, module.weight, module.weight_quantizer, block)
        if self.hidden % block:
            raise QATError(f"layer `{name}`: GatherBlockQuantized needs the hidden size {self.hidden} to be a multiple "
                           f"of the block size {block}")
        tied = head_projection is not None and _same_blocks(blocked, head_projection.blocked)
        codes, scales, zero_points = self._store_blocked("lm_head" if tied else "model.embed_tokens", blocked)
        self._tied_head = (head_projection, [codes, scales, zero_points]) if tied else None
        shape = self.g.constant("/model/embed_tokens/rows_shape", np.array(blocked.rows().shape, np.int64))
        (rows,) = self.g.node("Reshape", [codes, shape], "/model/embed_tokens/Reshape")
        inputs = [rows, "input_ids", scales] + ([zero_points] if zero_points else [])
        (y,) = self.g.node("GatherBlockQuantized", inputs, "/model/embed_tokens/GatherBlockQuantized", domain=MS, bits=blocked.bits,
                           block_size=block, gather_axis=0, quantize_axis=1)
        self.layers[name] = {"op": "GatherBlockQuantized", "node": "/model/embed_tokens/GatherBlockQuantized", "bits": blocked.bits,
                             "block_size": block, "codes": codes, "scales": scales, "zero_points": zero_points or None}
        return y

    # -- the model -------------------------------------------------------------------------------

    def rotary_tables(self) -> tuple[str, str]:
        """cos/sin ``(context_length, head_size / 2)`` from the model's own rotary module."""
        rotary = self.lm.model.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type not in ("default", "llama3", "linear"):
            raise QATError(f"export_genai: rotary embedding `{rope_type}` changes with the sequence length; "
                           "supported: default, linear, llama3")
        positions = torch.arange(self.context_length)[None]
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
        half = self.head_size // 2
        return (self.g.constant("cos_cache", _numpy(cos[0, :, :half])), self.g.constant("sin_cache", _numpy(sin[0, :, :half])))

    def norm_weight(self, module: nn.Module, prefix: str) -> tuple[str, float]:
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or self.config.rms_norm_eps
        return self.g.constant(f"{prefix}.weight", _numpy(module.weight)), float(eps)

    def mask_inputs(self) -> tuple[str, str]:
        """GroupQueryAttention's view of ``attention_mask`` ``(batch, total)``: each row's valid
        length minus one (``seqlens_k``) and ``total``. Rows are right-padded, as onnxruntime-genai
        pads a batch (its mask is 0 only for trailing padding), and each row's cache is compact:
        a new token's key and value go right after the row's last real one."""
        g, c = self.g, self.g.constant
        counts = g.node("ReduceSum", ["attention_mask", c("/model/axis_1", np.array([1], np.int64))], "/model/attn_mask/ReduceSum",
                        keepdims=0)[0]
        one = c("/model/one", np.array(1, np.int64))
        seqlens = g.node("Sub", [counts, one], "/model/attn_mask/Sub")[0]
        seqlens_k = g.node("Cast", [seqlens], "/model/attn_mask/seqlens_k", to=TensorProto.INT32)[0]
        shape = g.node("Shape", ["attention_mask"], "/model/attn_mask/Shape")[0]
        total = g.node("Gather", [shape, one], "/model/attn_mask/total", axis=0)[0]
        total_len = g.node("Cast", [total], "/model/attn_mask/total_sequence_length", to=TensorProto.INT32)[0]
        return seqlens_k, total_len

    def build(self) -> onnx.ModelProto:
        g, config, lm = self.g, self.config, self.lm
        base = lm.model
        layers = list(base.layers)
        seqlens_k, total_len = self.mask_inputs()
        cos, sin = self.rotary_tables()
        hidden = self.embedding(base.embed_tokens, lm.lm_head)
        residual, pending = hidden, None
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        for i, layer in enumerate(layers):
            p = f"/model/layers.{i}"
            weight, eps = self.norm_weight(layer.input_layernorm, f"model.layers.{i}.input_layernorm")
            if pending is None:
                normed = g.node("SimplifiedLayerNormalization", [residual, weight], f"{p}/input_layernorm", axis=-1, epsilon=eps,
                                stash_type=1)[0]
            else:
                normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [residual, pending, weight],
                                                f"{p}/input_layernorm", outputs=4, domain=MS, epsilon=eps)
            attn = layer.self_attn
            qkv = self.linears(normed, [attn.q_proj, attn.k_proj, attn.v_proj], [f"{p}/attn/{n}" for n in ("q_proj", "k_proj", "v_proj")],
                               f"{p}/attn/qkv_proj")
            query, key, value = (qkv[0], "", "") if len(qkv) == 1 else qkv
            scale = float(getattr(attn, "scaling", self.head_size**-0.5))
            out = g.node("GroupQueryAttention", [query, key, value, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k,
                                                 total_len, cos, sin], f"{p}/attn/GroupQueryAttention",
                         outputs=[f"{p}/attn/output", f"present.{i}.key", f"present.{i}.value"], domain=MS, num_heads=self.heads,
                         kv_num_heads=self.kv_heads, scale=scale, local_window_size=int(window or -1), do_rotary=1,
                         rotary_interleaved=0, softcap=0.0)[0]
            (attn_out,) = self.linears(out, [attn.o_proj], [f"{p}/attn/o_proj"], f"{p}/attn/o_proj")
            weight, eps = self.norm_weight(layer.post_attention_layernorm, f"model.layers.{i}.post_attention_layernorm")
            normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [residual, attn_out, weight],
                                            f"{p}/post_attention_layernorm", outputs=4, domain=MS, epsilon=eps)
            mlp = layer.mlp
            gate = self.linears(normed, [mlp.gate_proj], [f"{p}/mlp/gate_proj"], f"{p}/mlp/gate_proj")[0]
            up = self.linears(normed, [mlp.up_proj], [f"{p}/mlp/up_proj"], f"{p}/mlp/up_proj")[0]
            sigmoid = g.node("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")[0]
            act = g.node("Mul", [gate, sigmoid], f"{p}/mlp/act_fn/Mul")[0]
            product = g.node("Mul", [act, up], f"{p}/mlp/Mul")[0]
            (pending,) = self.linears(product, [mlp.down_proj], [f"{p}/mlp/down_proj"], f"{p}/mlp/down_proj")
        weight, eps = self.norm_weight(base.norm, "model.norm")
        final = g.node("SkipSimplifiedLayerNormalization", [residual, pending, weight], "/model/norm", outputs=1, domain=MS, epsilon=eps)[0]
        logits = self._head(final)
        next(n for n in g.nodes if logits in n.output).output[0] = "logits"
        return self._model(len(layers))

    def _head(self, x: str) -> str:
        if self._tied_head:
            projection, stored = self._tied_head
            return self.matmul(x, [projection], "/lm_head", stored=stored)
        return self.linears(x, [self.lm.lm_head], ["/lm_head"], "/lm_head")[0]

    def _model(self, n_layers: int) -> onnx.ModelProto:
        float_type, int_type = TensorProto.FLOAT, TensorProto.INT64
        kv = ["batch_size", self.kv_heads, "past_sequence_length", self.head_size]
        present = ["batch_size", self.kv_heads, "total_sequence_length", self.head_size]
        inputs = [helper.make_tensor_value_info("input_ids", int_type, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", int_type, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", float_type, ["batch_size", "sequence_length", self.config.vocab_size])]
        for i in range(n_layers):
            for part in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{part}", float_type, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{part}", float_type, present))
        graph = helper.make_graph(self.g.nodes, "decoder", inputs, outputs, initializer=self.g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="lightning-qat")
        model.ir_version = 10
        return model

