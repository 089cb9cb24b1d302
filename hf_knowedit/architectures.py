"""Where things live inside each supported transformers model, and how it scales what it computes.

One declarative table, keyed by ``config.model_type`` and nothing else: no guessing from
class names, module names or weight shapes. Each row was checked against the modules of a
freshly instantiated model in transformers 5.25 (see ``tests/test_architectures.py``).

Paths are dotted attribute paths; integer segments index ``nn.ModuleList``\\ s. ``backbone``,
``layers``, ``embed``, ``final_norm`` and ``lm_head`` are relative to the loaded model;
``mlp_out`` and ``attn_out`` are relative to one decoder block. The module at ``mlp_out`` is
the one ROME/MEMIT rewrite: its input is the key ``k`` (the MLP inner activation), its output
the value ``v`` added to the residual stream.

Four kinds of models are listed:

* dense text decoders (``*ForCausalLM``), some of which scale what they compute: Granite divides its
  logits by ``logits_scaling`` and scales each block's MLP and attention output by
  ``residual_multiplier`` before the residual add, Command-R multiplies its logits by
  ``logit_scale`` (the columns ``logit_scale``, ``logit_divisor``, ``residual_multiplier``);
* hybrid stacks (``*ForCausalLM``), where attention is mixed with state-space (Mamba2) or
  short-convolution token mixers: LFM2 and Bamba alternate attention blocks with convolution or
  Mamba2 blocks, which have no ``attn_out`` module (:func:`attention_layers`; causal tracing restores
  attention outputs only in attention blocks); Falcon-H1 runs attention and Mamba2 side by side in
  every block and scales its MLP output by ``mlp_multipliers[1]`` and its logits by
  ``lm_head_multiplier``. Their caches hold recurrent / convolution state besides keys and values,
  so the v*/z steps run every position (``prefix_cache="off"``) and causal tracing runs full-length
  forwards instead of resuming from a cache;
* multimodal wrappers around a text decoder (``*ForConditionalGeneration``: Gemma 3 4B-27B,
  Mistral Small 3, Qwen2.5-VL, Qwen3-VL, LLaVA, LLaVA-NeXT): the paths lead into the wrapper's
  ``model.language_model`` and to its ``lm_head``, so edits, traces and adapters name the
  wrapper's own modules and the vision tower is never touched; the decoder's settings are read
  from the sub-config the ``text_config`` column names. Only text prompts are edited and traced;
* mixture-of-experts decoders, whose blocks route each token to a few experts (the ``experts``
  column names the routed experts, ``mlp`` the whole block that causal tracing restores). Where a
  block has a shared expert that every token passes (DeepSeek-V2/V3, GLM-4.5, dots1, ERNIE-4.5,
  Hunyuan, Llama 4, Qwen2-MoE), ``mlp_out`` is that expert's down projection and the routed experts
  are not written (Qwen2-MoE gates it per token: ``mlp_out_gate``). Otherwise (Mixtral, Qwen3-MoE,
  OLMoE, PhiMoE, MiniMax-M2, GraniteMoE, GPT-OSS) ``mlp_out`` is the routed experts module itself, edited
  as one matrix on the routing-weighted keys of all its experts (``mlp_out_layout="experts"``; GPT-OSS, whose
  experts are stored transposed and carry biases: ``"experts_t"``; :mod:`hf_knowedit.experts`). The routers
  and the experts' biases are never written.

Every setting read from the model's config (soft-cap, logit scales, residual multiplier, heads,
vocabulary, sliding window) is read through :func:`decoder_config`. To add a model, describe it
and register it::

    import hf_knowedit
    hf_knowedit.register_architecture(hf_knowedit.ArchitectureSpec(
        model_type="my_llama", backbone="model", layers="model.layers",
        mlp_out="mlp.down_proj", mlp_out_layout="linear", attn_out="self_attn.o_proj",
        embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head"))
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .errors import DeviceMapError, InvalidConfigError, LayerOutOfRangeError, UnsupportedArchitectureError

__all__ = [
    "ArchitectureSpec",
    "ARCHITECTURES",
    "LAYOUTS",
    "EXPERT_LAYOUTS",
    "LAYOUT_PARAM",
    "PEFT_TARGETS",
    "edited_param",
    "to_param",
    "from_param",
    "register_architecture",
    "get_architecture",
    "supported_architectures",
    "get_module",
    "layer_path",
    "mlp_out_path",
    "mlp_path",
    "mlp_out_gate_path",
    "experts_path",
    "attn_out_path",
    "attention_layers",
    "num_layers",
    "mlp_out_dims",
    "model_device",
    "execution_device",
    "read_tensor",
    "write_tensor",
    "stage_tensor",
    "saved_tensor",
    "check_dispatch",
    "lm_logits",
    "decoder_config",
    "config_setting",
    "residual_scale",
]

#: how ``mlp_out`` stores the matrix ``W [out, in]`` the methods edit: nn.Linear's ``weight`` is ``W``; transformers'
#: Conv1D ``weight`` is ``Wᵀ``; ``"experts"``: ``mlp_out`` is a mixture-of-experts block's routed experts
#: (:mod:`hf_knowedit.experts`) whose ``down_proj [E, out, I]`` holds ``W = [W_0 … W_{E-1}]``, ``in = E·I``;
#: ``"experts_t"``: routed experts stored transposed, with biases (GPT-OSS), whose ``down_proj [E, I, out]`` holds
#: ``W_eᵀ`` for every expert ``e``
LAYOUTS = ("linear", "conv1d", "experts", "experts_t")
#: the layouts of routed experts: ``mlp_out`` holds one 3-D ``down_proj`` and acts on routed keys
EXPERT_LAYOUTS = ("experts", "experts_t")
#: the parameter of ``mlp_out`` that holds ``W`` in each layout
LAYOUT_PARAM = {"linear": "weight", "conv1d": "weight", "experts": "down_proj", "experts_t": "down_proj"}
#: how a PEFT adapter names ``mlp_out`` (ArchitectureSpec.peft_target): the module (``target_modules``) or its
#: weight parameter (``target_parameters``)
PEFT_TARGETS = ("module", "parameter")
#: how the v*/z steps may skip the positions before the subject (ArchitectureSpec.prefix_cache)
PREFIX_CACHE = ("rows", "common", "off")

_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: a config attribute, or entry ``i`` of a list attribute: ``"mlp_multipliers[1]"``
_SETTING_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[([0-9]+)\])?$")
_PATH_FIELDS = ("backbone", "layers", "mlp_out", "attn_out", "embed", "final_norm", "lm_head")
#: block-relative paths a row may leave None
_OPTIONAL_PATH_FIELDS = ("mlp", "mlp_out_gate", "experts")
#: the columns that name a config attribute, with an example of each
_CONFIG_FIELDS = {
    "logit_softcap": "final_logit_softcapping",
    "text_config": "text_config",
    "logit_scale": "logit_scale",
    "logit_divisor": "logits_scaling",
    "residual_multiplier": "residual_multiplier",
}
#: the columns that may name an entry of a list attribute (``name[i]``)
_INDEXED_CONFIG_FIELDS = ("logit_scale", "logit_divisor", "residual_multiplier")


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one ``config.model_type``. Validated on construction.

    Attributes:
        model_type: ``config.model_type`` this row applies to.
        backbone: path from the ``*ForCausalLM`` to the base model, whose output
            (``last_hidden_state``) is the final-normed hidden state fed to ``lm_head``.
        layers: path from the ``*ForCausalLM`` to the ``nn.ModuleList`` of decoder blocks.
        mlp_out: path, relative to one block, of the MLP output projection (the edited weight).
        mlp_out_layout: ``"linear"`` (weight ``[out, in]``), ``"conv1d"`` (weight ``[in, out]``), ``"experts"``
            (``mlp_out`` is the routed experts module of a mixture-of-experts block, edited as one matrix
            ``[W_0 … W_{E-1}]`` acting on the routing-weighted keys of all experts: :mod:`hf_knowedit.experts`) or
            ``"experts_t"`` (the same, for experts stored transposed with biases, GPT-OSS: ``down_proj [E, I, out]``).
        attn_out: path, relative to one block, of the attention output projection. In hybrid stacks only the
            attention blocks have it (:func:`attention_layers`).
        embed: path from the ``*ForCausalLM`` to the token embedding.
        final_norm: path from the ``*ForCausalLM`` to the final norm.
        lm_head: path from the ``*ForCausalLM`` to the LM head.
        logit_softcap: name of the config attribute holding final-logit soft-capping
            (``logits = cap * tanh(logits / cap)`` when it is not None), or None.
        prefix_cache: how the v*/z steps may reuse the keys / values of the positions before the
            subject's last token (:mod:`hf_knowedit.methods.targets`): ``"rows"`` each row from its own
            subject on (needs attention that depends on positions, not on cache indices), ``"common"``
            every row from the earliest subject of its batch on (e.g. local attention over index
            distances), ``"off"`` never (hybrid stacks, whose caches hold recurrent / convolution state that
            cannot be cut at each row's subject).
        mlp_post_norm: path, relative to one block, of a norm applied to the MLP's output before it is
            added to the residual stream (Gemma 2/3, OLMo 2/3, EXAONE 4: ``post_feedforward_layernorm``;
            GLM-4: ``post_mlp_layernorm``), or None. The MEMIT family writes residual-stream changes into ``mlp_out``; through such a
            norm they must first be mapped back to a change of its input (``methods/memit.py``).
        mlp_post_norm_eps: name of that norm module's attribute holding its epsilon (OLMo 2/3, EXAONE 4
            and GLM-4: ``variance_epsilon``; Gemma 2/3: ``eps``).
        mlp_post_norm_gain_offset: that norm is the RMS norm ``(offset + weight) ⊙ x / sqrt(mean(x²) + eps)``
            of its ``weight`` parameter: ``0.0`` for OLMo 2/3, EXAONE 4 and GLM-4, ``1.0`` for Gemma 2/3
            (``1 + weight``).
        gguf_arch: llama.cpp's name of this architecture (``general.architecture`` of its GGUF files,
            e.g. ``"llama"``, ``"gemma3"``), or None: edits of this model_type cannot be exported to GGUF.
        gguf_mlp_out: llama.cpp's name of the ``mlp_out`` tensor within one block (``"ffn_down"``: block
            ``i``'s weight is ``blk.{i}.ffn_down.weight``), or None. Declared together with ``gguf_arch``
            (:mod:`hf_knowedit.export_gguf`).
        text_config: name of the config attribute holding the text decoder's config (multimodal wrappers:
            ``"text_config"``), or None when the model's config is the decoder's. Every config attribute
            named in this table, and every decoder setting the library reads, comes from there
            (:func:`decoder_config`).
        logit_scale: name of the config attribute the model multiplies its logits by (Command-R:
            ``logit_scale``; Falcon-H1: ``lm_head_multiplier``), or None.
        logit_divisor: name of the config attribute the model divides its logits by (Granite:
            ``logits_scaling``), or None. These two and ``residual_multiplier`` may also name entry ``i`` of
            a list attribute as ``"name[i]"`` (:func:`config_setting`).
        mlp: path, relative to one block, of the whole MLP whose output is added to the residual stream, when
            that is more than ``mlp_out``'s output (a mixture-of-experts block: its shared expert, whose
            ``down_proj`` is ``mlp_out``, plus its routed experts), or None: ``mlp_out``. Causal tracing's
            ``"mlp"`` restorations set back this module's output (:mod:`hf_knowedit.tracing`).
        mlp_out_gate: path, relative to one block, of a ``Linear`` with one output whose sigmoid the block
            multiplies ``mlp_out``'s output by, per token (Qwen2-MoE, Qwen3.5-MoE, Qwen3-Next:
            ``mlp.shared_expert_gate``), or None. The MEMIT family divides its residual targets by that
            gate at each subject's last token before writing them into ``mlp_out`` (``methods/memit.py``).
        experts: path, relative to one block, of the routed experts of a mixture-of-experts block (a module
            holding the experts' 3-D weights, e.g. ``mlp.experts``; its forward receives the hidden states,
            the top-k expert indices and their weights), or None for a dense MLP. Edits write into
            ``mlp_out``, not into the routed experts; the column tells routing measurements
            (:mod:`hf_knowedit.evaluation.routing`) where the routing decisions are.
        residual_multiplier: name of the config attribute each block multiplies its MLP output by before
            adding it to the residual stream (Granite: ``residual_multiplier``, which scales the attention
            output too; Falcon-H1: ``mlp_multipliers[1]``, its MLP's down multiplier), or None.
            The MEMIT family's residual targets are divided by it before they are written into ``mlp_out``
            (``methods/memit.py``); NAS's ``v0`` is the MLP output times it.
        peft_target: how PEFT adapters of this model type name a ``"linear"`` ``mlp_out``: ``"module"`` (in
            ``target_modules``) or ``"parameter"`` (its ``weight`` in ``target_parameters``, a 2-D LoRA that PEFT
            computes and merges like the module's; :mod:`hf_knowedit.adapter_files`). ``"parameter"`` is for rows
            whose ``mlp_out`` PEFT would otherwise retarget: under transformers 5, PEFT (0.21) rewrites the
            ``target_modules`` of model types that transformers converts from the v4 per-expert checkpoint layout
            (DeepSeek-V2/V3, GLM-4.5, dots1, ERNIE-4.5-MoE, Hunyuan-MoE, Qwen3-Next) so that every name ending in
            ``.down_proj`` (meant for v4's per-expert Linear modules) becomes the routed experts' ``down_proj``
            parameter in every layer; a shared expert's ``down_proj`` named there would load as a LoRA on the
            routed experts instead. ``target_parameters`` are not rewritten. Qwen2-MoE and Llama 4 keep
            ``"module"`` (PEFT does not rewrite their targets; ``tests/test_adapters.py`` checks every
            mixture-of-experts row), which engines that read only ``target_modules`` (vLLM) can also load.
    """

    model_type: str
    backbone: str
    layers: str
    mlp_out: str
    mlp_out_layout: str
    attn_out: str
    embed: str
    final_norm: str
    lm_head: str
    logit_softcap: str | None = None
    prefix_cache: str = "rows"
    mlp_post_norm: str | None = None
    mlp_post_norm_eps: str = "variance_epsilon"
    mlp_post_norm_gain_offset: float = 0.0
    gguf_arch: str | None = None
    gguf_mlp_out: str | None = None
    text_config: str | None = None
    logit_scale: str | None = None
    logit_divisor: str | None = None
    residual_multiplier: str | None = None
    mlp: str | None = None
    mlp_out_gate: str | None = None
    experts: str | None = None
    peft_target: str = "module"

    def __post_init__(self) -> None:
        if not isinstance(self.model_type, str) or not self.model_type.strip():
            raise InvalidConfigError(f"ArchitectureSpec.model_type must be a non-empty string, got {self.model_type!r}")
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not _PATH_RE.match(value):
                raise InvalidConfigError(
                    f"ArchitectureSpec({self.model_type!r}).{name} must be a dotted module path "
                    f"like 'model.layers' (integer segments index ModuleLists), got {value!r}"
                )
        if self.mlp_out_layout not in LAYOUTS:
            raise InvalidConfigError(
                f"ArchitectureSpec({self.model_type!r}).mlp_out_layout must be one of {LAYOUTS} "
                f"('linear': nn.Linear, weight [out, in]; 'conv1d': transformers Conv1D, weight [in, out]; "
                f"'experts': a mixture-of-experts block's routed experts, down_proj [E, out, I]; 'experts_t': "
                f"routed experts stored transposed with biases, down_proj [E, I, out]), "
                f"got {self.mlp_out_layout!r}"
            )
        if self.peft_target not in PEFT_TARGETS or (self.peft_target != "module" and self.mlp_out_layout != "linear"):
            raise InvalidConfigError(
                f"ArchitectureSpec({self.model_type!r}).peft_target must be one of {PEFT_TARGETS} ('parameter' only "
                f"with mlp_out_layout 'linear': PEFT adapters name mlp_out's weight in target_parameters), got "
                f"{self.peft_target!r} with layout {self.mlp_out_layout!r}"
            )
        if self.mlp_post_norm is not None and not (
            isinstance(self.mlp_post_norm, str) and _PATH_RE.match(self.mlp_post_norm)
        ):
            raise InvalidConfigError(
                f"ArchitectureSpec({self.model_type!r}).mlp_post_norm must be None or a dotted module path "
                f"relative to one block (e.g. 'post_feedforward_layernorm'), got {self.mlp_post_norm!r}"
            )
        for name in _OPTIONAL_PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and _PATH_RE.match(value)):
                raise InvalidConfigError(
                    f"ArchitectureSpec({self.model_type!r}).{name} must be None or a dotted module path "
                    f"relative to one block (e.g. 'mlp.experts'), got {value!r}"
                )
        if not (isinstance(self.mlp_post_norm_eps, str) and _IDENT_RE.match(self.mlp_post_norm_eps)):
            raise InvalidConfigError(
                f"ArchitectureSpec({self.model_type!r}).mlp_post_norm_eps must name the post-MLP norm's epsilon "
                f"attribute (e.g. 'variance_epsilon' or 'eps'), got {self.mlp_post_norm_eps!r}"
            )
        offset = self.mlp_post_norm_gain_offset
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise InvalidConfigError(
                f"ArchitectureSpec({self.model_type!r}).mlp_post_norm_gain_offset must be a finite number, the "
                f"post-MLP norm's gain being offset + weight (0.0 for weight, 1.0 for Gemma's 1 + weight), "
                f"got {offset!r}"
            )
        if self.prefix_cache not in PREFIX_CACHE:
            raise InvalidConfigError(
                f"ArchitectureSpec({self.model_type!r}).prefix_cache must be one of {PREFIX_CACHE}, "
                f"got {self.prefix_cache!r}"
            )
        if (self.gguf_arch is None) != (self.gguf_mlp_out is None) or not all(
            v is None or (isinstance(v, str) and _IDENT_RE.match(v)) for v in (self.gguf_arch, self.gguf_mlp_out)
        ):
            raise InvalidConfigError(
                f"ArchitectureSpec({self.model_type!r}).gguf_arch and gguf_mlp_out must both be None or both be "
                f"llama.cpp names (e.g. gguf_arch='llama', gguf_mlp_out='ffn_down'), got "
                f"{self.gguf_arch!r} and {self.gguf_mlp_out!r}"
            )
        for name, example in _CONFIG_FIELDS.items():
            value = getattr(self, name)
            pattern, form = (_SETTING_RE, " or name[i]") if name in _INDEXED_CONFIG_FIELDS else (_IDENT_RE, "")
            if value is not None and not (isinstance(value, str) and pattern.match(value)):
                raise InvalidConfigError(
                    f"ArchitectureSpec({self.model_type!r}).{name} must be None or the name of a config "
                    f"attribute{form} (e.g. {example!r}), got {value!r}"
                )


# -----------------------------------------------------------------------------
# the table

S = ArchitectureSpec
_SOFTCAP = "final_logit_softcapping"
#: the norm Gemma 2/3, OLMo 2/3 and EXAONE 4 apply to the MLP output before the residual add
_POST_FFN_NORM = "post_feedforward_layernorm"
#: Gemma's RMS norms keep their epsilon in ``eps`` and scale by ``1 + weight``
#: multimodal wrappers keep the text decoder's settings in this sub-config
_TEXT = "text_config"
_GEMMA_POST_FFN_NORM = dict(mlp_post_norm=_POST_FFN_NORM, mlp_post_norm_eps="eps", mlp_post_norm_gain_offset=1.0)
#: a mixture-of-experts block at ``mlp`` with routed experts and ungated shared experts, of a model type whose
#: PEFT targets PEFT rewrites (ArchitectureSpec.peft_target)
_MOE_SHARED_EXPERTS = dict(mlp="mlp", experts="mlp.experts", peft_target="parameter")
#: a mixture-of-experts block at ``mlp`` whose routed experts are the edited module
_MOE_ROUTED = dict(mlp="mlp", experts="mlp.experts")
#: llama.cpp's name of the MLP output projection in one block (``blk.{i}.ffn_down.weight``)
_FFN_DOWN = "ffn_down"

# fmt: off
_TABLE: list[ArchitectureSpec] = [
    #  model_type           backbone              layers                        mlp_out                layout    attn_out                      embed                             final_norm                            lm_head    logit_softcap
    # --- GPT-2 style: transformer.h[i]
    S("gpt2",              "transformer",        "transformer.h",              "mlp.c_proj",          "conv1d", "attn.c_proj",                "transformer.wte",                "transformer.ln_f",                   "lm_head"),
    S("gpt_bigcode",       "transformer",        "transformer.h",              "mlp.c_proj",          "linear", "attn.c_proj",                "transformer.wte",                "transformer.ln_f",                   "lm_head"),
    # GPT-Neo's local attention masks by cache-index distance: every row must keep its indices
    S("gpt_neo",           "transformer",        "transformer.h",              "mlp.c_proj",          "linear", "attn.attention.out_proj",    "transformer.wte",                "transformer.ln_f",                   "lm_head", prefix_cache="common"),
    S("gptj",              "transformer",        "transformer.h",              "mlp.fc_out",          "linear", "attn.out_proj",              "transformer.wte",                "transformer.ln_f",                   "lm_head"),
    S("codegen",           "transformer",        "transformer.h",              "mlp.fc_out",          "linear", "attn.out_proj",              "transformer.wte",                "transformer.ln_f",                   "lm_head"),
    S("bloom",             "transformer",        "transformer.h",              "mlp.dense_4h_to_h",   "linear", "self_attention.dense",       "transformer.word_embeddings",    "transformer.ln_f",                   "lm_head"),
    # Falcon adds the attention output to dense_4h_to_h's output *in place*: clone in hooks
    S("falcon",            "transformer",        "transformer.h",              "mlp.dense_4h_to_h",   "linear", "self_attention.dense",       "transformer.word_embeddings",    "transformer.ln_f",                   "lm_head"),
    S("mpt",               "transformer",        "transformer.blocks",         "ffn.down_proj",       "linear", "attn.out_proj",              "transformer.wte",                "transformer.norm_f",                 "lm_head"),
    # --- GPT-NeoX style
    S("gpt_neox",          "gpt_neox",           "gpt_neox.layers",            "mlp.dense_4h_to_h",   "linear", "attention.dense",            "gpt_neox.embed_in",              "gpt_neox.final_layer_norm",          "lm_head"),
    # attention.dense has no bias here: the model adds the attention bias outside that module
    S("gpt_neox_japanese", "gpt_neox_japanese",  "gpt_neox_japanese.layers",   "mlp.dense_4h_to_h",   "linear", "attention.dense",            "gpt_neox_japanese.embed_in",     "gpt_neox_japanese.final_layer_norm", "embed_out"),
    # --- fairseq style: fc1/fc2 directly on the block, no `mlp` submodule
    # (OPT flattens tokens: fc2's input is [batch*seq, d_in]. OPT checkpoints with
    #  do_layer_norm_before=False, e.g. opt-350m, have no final_layer_norm.)
    S("opt",               "model",              "model.decoder.layers",       "fc2",                 "linear", "self_attn.out_proj",         "model.decoder.embed_tokens",     "model.decoder.final_layer_norm",     "lm_head"),
    S("xglm",              "model",              "model.layers",               "fc2",                 "linear", "self_attn.out_proj",         "model.embed_tokens",             "model.layer_norm",                   "lm_head"),
    S("biogpt",            "biogpt",             "biogpt.layers",              "fc2",                 "linear", "self_attn.out_proj",         "biogpt.embed_tokens",            "biogpt.layer_norm",                  "output_projection"),
    # --- model.layers[i], non-Llama MLP or attention names
    S("phi",               "model",              "model.layers",               "mlp.fc2",             "linear", "self_attn.dense",            "model.embed_tokens",             "model.final_layernorm",              "lm_head"),
    S("persimmon",         "model",              "model.layers",               "mlp.dense_4h_to_h",   "linear", "self_attn.dense",            "model.embed_tokens",             "model.final_layernorm",              "lm_head"),
    S("starcoder2",        "model",              "model.layers",               "mlp.c_proj",          "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("nanochat",          "model",              "model.layers",               "mlp.fc2",             "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", _SOFTCAP),
    # --- Llama style: model.layers[i].mlp.down_proj (gated, fused gate_up, or plain up/down MLP)
    S("llama",             "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", gguf_arch="llama", gguf_mlp_out=_FFN_DOWN),
    S("mistral",           "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("ministral",         "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("ministral3",        "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("diffllama",         "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("cwm",               "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("qwen2",             "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", gguf_arch="qwen2", gguf_mlp_out=_FFN_DOWN),
    S("qwen3",             "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", gguf_arch="qwen3", gguf_mlp_out=_FFN_DOWN),
    S("seed_oss",          "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("phi3",              "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("olmo",              "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("olmo2",             "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", mlp_post_norm=_POST_FFN_NORM),
    S("olmo3",             "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", mlp_post_norm=_POST_FFN_NORM),
    S("stablelm",          "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("smollm3",           "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("glm",               "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    # GLM-4 norms the MLP output (post_mlp_layernorm: weight ⊙ x / rms, variance_epsilon) before the residual add
    S("glm4",              "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", mlp_post_norm="post_mlp_layernorm"),
    S("helium",            "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("nemotron",          "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("exaone4",           "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", mlp_post_norm=_POST_FFN_NORM),
    S("arcee",             "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("apertus",           "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("ernie4_5",          "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("hunyuan_v1_dense",  "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    S("jais2",             "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head"),
    # --- mixture of experts with a shared expert: edits write into the shared expert's down_proj, whose output
    # the block multiplies by sigmoid(shared_expert_gate(x)) and adds to the routed experts' output
    S("qwen2_moe",         "model",              "model.layers",               "mlp.shared_expert.down_proj", "linear", "self_attn.o_proj",   "model.embed_tokens",             "model.norm",                         "lm_head", mlp="mlp", mlp_out_gate="mlp.shared_expert_gate", experts="mlp.experts"),
    # --- Gemma family (embedding scale lives inside the embedding module)
    S("gemma",             "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", gguf_arch="gemma", gguf_mlp_out=_FFN_DOWN),
    S("gemma2",            "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", _SOFTCAP, **_GEMMA_POST_FFN_NORM, gguf_arch="gemma2", gguf_mlp_out=_FFN_DOWN),
    S("gemma3_text",       "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", _SOFTCAP, **_GEMMA_POST_FFN_NORM, gguf_arch="gemma3", gguf_mlp_out=_FFN_DOWN),
    S("vaultgemma",        "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", _SOFTCAP),
    # --- scaled logits and residuals: the model's own multipliers, read from its config
    S("granite",           "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", logit_divisor="logits_scaling", residual_multiplier="residual_multiplier"),
    # Command-R: attention and MLP in parallel on one input norm
    S("cohere",            "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", logit_scale="logit_scale"),
    S("cohere2",           "model",              "model.layers",               "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.embed_tokens",             "model.norm",                         "lm_head", logit_scale="logit_scale"),
    # --- mixture-of-experts blocks with a shared expert: edits write into the shared expert's down projection
    # (every token passes it; the routed experts and the routers are not written), tracing's "mlp" is the
    # whole block (shared + routed experts). Blocks that hold a dense MLP instead (DeepSeek's and GLM-4.5's
    # first `first_k_dense_replace` layers, Llama 4's non-MoE layers) have no shared expert to edit. Adapters name
    # the shared expert's weight in PEFT's target_parameters where PEFT would retarget a module name (peft_target).
    S("deepseek_v2",       "model",              "model.layers",               "mlp.shared_experts.down_proj", "linear", "self_attn.o_proj",  "model.embed_tokens",             "model.norm",                         "lm_head", **_MOE_SHARED_EXPERTS),
    S("deepseek_v3",       "model",              "model.layers",               "mlp.shared_experts.down_proj", "linear", "self_attn.o_proj",  "model.embed_tokens",             "model.norm",                         "lm_head", **_MOE_SHARED_EXPERTS),
    S("glm4_moe",          "model",              "model.layers",               "mlp.shared_experts.down_proj", "linear", "self_attn.o_proj",  "model.embed_tokens",             "model.norm",                         "lm_head", **_MOE_SHARED_EXPERTS),
    S("dots1",             "model",              "model.layers",               "mlp.shared_experts.down_proj", "linear", "self_attn.o_proj",  "model.embed_tokens",             "model.norm",                         "lm_head", **_MOE_SHARED_EXPERTS),
    S("ernie4_5_moe",      "model",              "model.layers",               "mlp.shared_experts.down_proj", "linear", "self_attn.o_proj",  "model.embed_tokens",             "model.norm",                         "lm_head", **_MOE_SHARED_EXPERTS),
    S("hunyuan_v1_moe",    "model",              "model.layers",               "mlp.shared_mlp.down_proj", "linear", "self_attn.o_proj",      "model.embed_tokens",             "model.norm",                         "lm_head", mlp="mlp", experts="mlp.experts", peft_target="parameter"),
    S("llama4_text",       "model",              "model.layers",               "feed_forward.shared_expert.down_proj", "linear", "self_attn.o_proj", "model.embed_tokens",      "model.norm",                         "lm_head", mlp="feed_forward", experts="feed_forward.experts"),
    # --- mixture-of-experts blocks without a shared expert: edits write the routed experts' down_proj as one
    # matrix [W_0 … W_{E-1}] on the routing-weighted keys (layout "experts", hf_knowedit/experts.py)
    S("mixtral",           "model",              "model.layers",               "mlp.experts",         "experts", "self_attn.o_proj",          "model.embed_tokens",             "model.norm",                         "lm_head", **_MOE_ROUTED),
    S("qwen3_moe",         "model",              "model.layers",               "mlp.experts",         "experts", "self_attn.o_proj",          "model.embed_tokens",             "model.norm",                         "lm_head", **_MOE_ROUTED),
    S("olmoe",             "model",              "model.layers",               "mlp.experts",         "experts", "self_attn.o_proj",          "model.embed_tokens",             "model.norm",                         "lm_head", **_MOE_ROUTED),
    S("phimoe",            "model",              "model.layers",               "mlp.experts",         "experts", "self_attn.o_proj",          "model.embed_tokens",             "model.norm",                         "lm_head", **_MOE_ROUTED),
    S("minimax_m2",        "model",              "model.layers",               "mlp.experts",         "experts", "self_attn.o_proj",          "model.embed_tokens",             "model.norm",                         "lm_head", **_MOE_ROUTED),
    # GPT-OSS: experts stored transposed with biases (layout "experts_t"), its own clamped SwiGLU; sliding-window
    # attention every other block masks by index distance (prefix_cache "common", as GPT-Neo), and its cache keeps a
    # window there, which is no plain DynamicCache: the v*/z steps then run every position (as Mistral's)
    S("gpt_oss",           "model",              "model.layers",               "mlp.experts",         "experts_t", "self_attn.o_proj",        "model.embed_tokens",             "model.norm",                         "lm_head", prefix_cache="common", **_MOE_ROUTED),
    S("granitemoe",        "model",              "model.layers",               "block_sparse_moe.experts", "experts", "self_attn.o_proj",     "model.embed_tokens",             "model.norm",                         "lm_head", mlp="block_sparse_moe", experts="block_sparse_moe.experts", logit_divisor="logits_scaling", residual_multiplier="residual_multiplier"),
    # --- hybrid stacks: attention mixed with state-space (Mamba2) or short-convolution blocks, a dense MLP in every
    # block. Blocks without attention have no attn_out module (attention_layers). Their caches hold recurrent / conv
    # state, which the v*/z prefix cache cannot cut per row: prefix_cache="off".
    # Falcon-H1: attention and Mamba2 side by side in every block; its MLP multiplies down_proj's output by
    # mlp_multipliers[1] and its head's output by lm_head_multiplier (the other multipliers act inside modules)
    S("falcon_h1",         "model",              "model.layers",               "feed_forward.down_proj", "linear", "self_attn.o_proj",         "model.embed_tokens",             "model.final_layernorm",              "lm_head", prefix_cache="off", logit_scale="lm_head_multiplier", residual_multiplier="mlp_multipliers[1]"),
    # LFM2: short-convolution blocks (conv.out_proj) and attention blocks; the final norm is embedding_norm
    S("lfm2",              "model",              "model.layers",               "feed_forward.w2",     "linear", "self_attn.out_proj",         "model.embed_tokens",             "model.embedding_norm",               "lm_head", prefix_cache="off"),
    # Bamba: Mamba2 blocks (mamba.out_proj) and attention blocks
    S("bamba",             "model",              "model.layers",               "feed_forward.down_proj", "linear", "self_attn.o_proj",         "model.embed_tokens",             "model.final_layernorm",              "lm_head", prefix_cache="off"),
    # --- hybrid stacks with mixture-of-experts blocks (prefix_cache "off" as above)
    # Qwen3-Next: Gated DeltaNet blocks beside attention blocks; a Qwen2-MoE block (gated shared expert)
    S("qwen3_next",        "model",              "model.layers",               "mlp.shared_expert.down_proj", "linear", "self_attn.o_proj",   "model.embed_tokens",             "model.norm",                         "lm_head", prefix_cache="off", mlp="mlp", mlp_out_gate="mlp.shared_expert_gate", experts="mlp.experts", peft_target="parameter"),
    # Granite 4 (hybrid): Mamba2 blocks beside attention blocks; the block adds block_sparse_moe(x) + shared_mlp(x)
    # with no module holding both, so the shared MLP is edited and tracing's "mlp" restores its output only
    S("granitemoehybrid",  "model",              "model.layers",               "shared_mlp.output_linear", "linear", "self_attn.o_proj",      "model.embed_tokens",             "model.norm",                         "lm_head", prefix_cache="off", experts="block_sparse_moe.experts", logit_divisor="logits_scaling", residual_multiplier="residual_multiplier"),
    # --- multimodal wrappers (*ForConditionalGeneration): the text decoder is model.language_model, the
    # LM head the wrapper's own; the vision tower (model.vision_tower / model.visual) is never touched.
    # Gemma3ForConditionalGeneration applies no final-logit soft-cap (Gemma 3 sets none), so no column.
    S("gemma3"           , "model.language_model", "model.language_model.layers", "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.language_model.embed_tokens", "model.language_model.norm",  "lm_head", **_GEMMA_POST_FFN_NORM, text_config=_TEXT),
    S("mistral3"         , "model.language_model", "model.language_model.layers", "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.language_model.embed_tokens", "model.language_model.norm",  "lm_head", text_config=_TEXT),
    S("qwen2_5_vl"       , "model.language_model", "model.language_model.layers", "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.language_model.embed_tokens", "model.language_model.norm",  "lm_head", text_config=_TEXT),
    S("qwen3_vl"         , "model.language_model", "model.language_model.layers", "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.language_model.embed_tokens", "model.language_model.norm",  "lm_head", text_config=_TEXT),
    S("llava"            , "model.language_model", "model.language_model.layers", "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.language_model.embed_tokens", "model.language_model.norm",  "lm_head", text_config=_TEXT),
    S("llava_next"       , "model.language_model", "model.language_model.layers", "mlp.down_proj",       "linear", "self_attn.o_proj",           "model.language_model.embed_tokens", "model.language_model.norm",  "lm_head", text_config=_TEXT),
]
# fmt: on
del S

ARCHITECTURES: dict[str, ArchitectureSpec] = {spec.model_type: spec for spec in _TABLE}
assert len(ARCHITECTURES) == len(_TABLE), "duplicate model_type in the architecture table"


# -----------------------------------------------------------------------------
# registry


def register_architecture(spec: ArchitectureSpec, *, overwrite: bool = False) -> ArchitectureSpec:
    """Add ``spec`` to :data:`ARCHITECTURES` (keyed by ``spec.model_type``) and return it.

    Fields are validated when the spec is constructed (an invalid field raises
    :class:`~hf_knowedit.errors.InvalidConfigError`, a ``ValueError``, naming the field).
    Registering a ``model_type`` that is already present raises ``InvalidConfigError``
    unless ``overwrite=True``.
    """
    if not isinstance(spec, ArchitectureSpec):
        raise InvalidConfigError(f"register_architecture expects an ArchitectureSpec, got {type(spec).__name__}")
    ArchitectureSpec.__post_init__(spec)  # re-validate (guards against object.__setattr__ tampering)
    if spec.model_type in ARCHITECTURES and not overwrite:
        raise InvalidConfigError(
            f"model_type {spec.model_type!r} is already registered; pass overwrite=True to replace it"
        )
    ARCHITECTURES[spec.model_type] = spec
    return spec


def supported_architectures() -> list[str]:
    """The registered ``config.model_type`` values, sorted."""
    return sorted(ARCHITECTURES)


def _model_type(model_or_config: Any) -> str:
    if isinstance(model_or_config, str):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedArchitectureError(
            f"cannot read config.model_type from {type(model_or_config).__name__}; "
            "pass a transformers model or its PretrainedConfig"
        )
    return model_type


def get_architecture(model_or_config: Any) -> ArchitectureSpec:
    """The :class:`ArchitectureSpec` for a model, a config, or a ``model_type`` string.

    The lookup uses ``config.model_type`` only. An unregistered type raises
    :class:`~hf_knowedit.errors.UnsupportedArchitectureError`.
    """
    model_type = _model_type(model_or_config)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        example = ARCHITECTURES.get("llama") or next(iter(ARCHITECTURES.values()), None)
        template = ""
        if example is not None:
            args = ",\n    ".join(
                f"{f.name}={(model_type if f.name == 'model_type' else getattr(example, f.name))!r}"
                for f in fields(ArchitectureSpec)
            )
            template = (
                "\nIf it is a dense-MLP decoder, describe where its modules live and register it "
                "(paths below are Llama's; check yours with model.named_modules()):\n"
                f"  hf_knowedit.register_architecture(hf_knowedit.ArchitectureSpec(\n    {args}))"
            )
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported. Supported types: "
            f"{', '.join(supported_architectures())}.{template}"
        )
    return spec


# -----------------------------------------------------------------------------
# resolving paths on a model


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule of ``model`` at dotted ``path`` (``""`` is ``model`` itself).

    Integer segments index ``nn.ModuleList``/``nn.Sequential``. A missing segment raises
    :class:`~hf_knowedit.errors.InvalidConfigError` naming the path, the segment and what
    the parent module does contain.
    """
    module = model
    if not path:
        return module
    done: list[str] = []
    for part in path.split("."):
        # ModuleList/Sequential register their entries under "0", "1", ...
        child = module._modules.get(part) if isinstance(module, nn.Module) else None
        if child is None:
            where = ".".join(done) or "<model>"
            if isinstance(module, (nn.ModuleList, nn.Sequential)):
                has = f"it has {len(module)} entries"
            else:
                names = list(module._modules) if isinstance(module, nn.Module) else []
                has = f"its children are: {', '.join(names) or '(none)'}"
            raise InvalidConfigError(
                f"{type(model).__name__} has no module at {path!r}: {where} "
                f"({type(module).__name__}) has no {part!r}; {has}"
            )
        module = child
        done.append(part)
    return module


def _check_index(layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise LayerOutOfRangeError(f"layer index must be an int, got {layer!r}")
    if layer < 0:
        raise LayerOutOfRangeError(f"layer index must be >= 0, got {layer}")
    return layer


def layer_path(spec: ArchitectureSpec, layer: int) -> str:
    """Full dotted path of decoder block ``layer``, e.g. ``"model.layers.3"``."""
    return f"{spec.layers}.{_check_index(layer)}"


def mlp_out_path(spec: ArchitectureSpec, layer: int) -> str:
    """Full dotted path of block ``layer``'s MLP output projection, e.g. ``"model.layers.3.mlp.down_proj"``."""
    return f"{layer_path(spec, layer)}.{spec.mlp_out}"


def mlp_path(spec: ArchitectureSpec, layer: int) -> str:
    """Full dotted path of the module whose output is block ``layer``'s whole MLP contribution: the
    :attr:`ArchitectureSpec.mlp` module (a mixture-of-experts block), else ``mlp_out``."""
    return mlp_out_path(spec, layer) if spec.mlp is None else f"{layer_path(spec, layer)}.{spec.mlp}"


def mlp_out_gate_path(spec: ArchitectureSpec, layer: int) -> str | None:
    """Full dotted path of the sigmoid gate on block ``layer``'s ``mlp_out`` output, or None
    (:attr:`ArchitectureSpec.mlp_out_gate`)."""
    return None if spec.mlp_out_gate is None else f"{layer_path(spec, layer)}.{spec.mlp_out_gate}"


def experts_path(spec: ArchitectureSpec, layer: int) -> str | None:
    """Full dotted path of block ``layer``'s routed experts, or None for a dense MLP
    (:attr:`ArchitectureSpec.experts`)."""
    return None if spec.experts is None else f"{layer_path(spec, layer)}.{spec.experts}"


def mlp_post_norm_path(spec: ArchitectureSpec, layer: int) -> str | None:
    """Full dotted path of the norm block ``layer`` applies to its MLP output, or None (see
    :attr:`ArchitectureSpec.mlp_post_norm`)."""
    return None if spec.mlp_post_norm is None else f"{layer_path(spec, layer)}.{spec.mlp_post_norm}"


def mlp_post_norm_gain_eps(model: nn.Module, spec: ArchitectureSpec, layer: int) -> tuple[torch.Tensor, float]:
    """The gain ``g = offset + weight`` (``[d]`` float64, CPU) and the epsilon of block ``layer``'s post-MLP
    norm, read from the module as the table says (:attr:`ArchitectureSpec.mlp_post_norm_eps`,
    ``mlp_post_norm_gain_offset``). A norm without them raises
    :class:`~hf_knowedit.errors.UnsupportedArchitectureError`."""
    path = mlp_post_norm_path(spec, layer)
    if path is None:
        raise UnsupportedArchitectureError(f"{spec.model_type!r} has no post-MLP norm in the architecture table")
    norm = get_module(model, path)
    eps = getattr(norm, spec.mlp_post_norm_eps, None)
    has_weight = isinstance(getattr(norm, "weight", None), torch.Tensor)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not has_weight:
        raise UnsupportedArchitectureError(
            f"The post-MLP norm {path} ({type(norm).__name__}) has no float attribute "
            f"{spec.mlp_post_norm_eps!r} or no weight: set the architecture table's mlp_post_norm_eps for "
            f"{spec.model_type!r} to the attribute holding its epsilon (register_architecture)."
        )
    gain = spec.mlp_post_norm_gain_offset + read_tensor(model, f"{path}.weight").detach().double().cpu()
    return gain, float(eps)


def attn_out_path(spec: ArchitectureSpec, layer: int) -> str:
    """Full dotted path of block ``layer``'s attention output projection, e.g. ``"model.layers.3.self_attn.o_proj"``."""
    return f"{layer_path(spec, layer)}.{spec.attn_out}"


def attention_layers(model: nn.Module, spec: ArchitectureSpec | None = None) -> list[int]:
    """The decoder blocks that have the table's ``attn_out`` module: every block, except in hybrid stacks whose
    other blocks mix tokens with a state-space or convolution mixer instead (LFM2, Bamba). A model where no
    block has it raises :class:`~hf_knowedit.errors.InvalidConfigError` naming the path."""
    spec = spec if spec is not None else get_architecture(model)
    blocks = get_module(model, spec.layers)
    found = []
    for i, block in enumerate(blocks):
        try:
            get_module(block, spec.attn_out)
        except InvalidConfigError:
            continue
        found.append(i)
    if not found and len(blocks):
        get_module(model, attn_out_path(spec, 0))  # raises, naming what block 0 has
    return found


def num_layers(model: nn.Module, spec: ArchitectureSpec | None = None) -> int:
    """Number of decoder blocks (length of the ``spec.layers`` ModuleList)."""
    spec = spec if spec is not None else get_architecture(model)
    return len(get_module(model, spec.layers))


def mlp_out_dims(model: nn.Module, spec: ArchitectureSpec, layer: int) -> tuple[int, int]:
    """``(d_in, d_out)`` of block ``layer``'s MLP output projection, from its weight and the declared layout.

    ``d_in`` is the MLP inner size (the key dimension), ``d_out`` the hidden size (the value dimension).
    """
    n = num_layers(model, spec)
    if not 0 <= _check_index(layer) < n:
        raise LayerOutOfRangeError(f"layer {layer} is out of range: the model has {n} layers [0, {n})")
    path = mlp_out_path(spec, layer)
    name = LAYOUT_PARAM[spec.mlp_out_layout]
    weight = getattr(get_module(model, path), name, None)
    dims = 3 if spec.mlp_out_layout in EXPERT_LAYOUTS else 2
    if not isinstance(weight, torch.Tensor) or weight.dim() != dims:
        shape = None if weight is None else tuple(getattr(weight, "shape", ()))
        raise InvalidConfigError(f"{path} has no {dims}-D {name} (got shape {shape}); cannot edit it")
    if spec.mlp_out_layout == "experts":
        experts, out, inner = weight.shape
        return experts * inner, out
    if spec.mlp_out_layout == "experts_t":
        experts, inner, out = weight.shape
        return experts * inner, out
    rows, cols = weight.shape
    return (cols, rows) if spec.mlp_out_layout == "linear" else (rows, cols)


def edited_param(path: str, layout: str) -> str:
    """The name of the parameter holding the edited matrix of module ``path`` in ``layout``
    (``"model.layers.3.mlp.down_proj.weight"``, ``"model.layers.3.mlp.experts.down_proj"``)."""
    return f"{path}.{LAYOUT_PARAM[layout]}"


def to_param(delta: torch.Tensor, layout: str, shape: Sequence[int]) -> torch.Tensor:
    """``ΔW [out, in]`` arranged as a change of the parameter of ``shape`` that stores ``W`` in ``layout``:
    itself (``linear``), transposed (``conv1d``), ``[E, out, I]`` blocks (``experts``) or ``[E, I, out]`` transposed
    blocks (``experts_t``). Exact (no arithmetic)."""
    if layout == "conv1d":
        return delta.t()
    if layout == "experts":
        experts, out, inner = shape
        return delta.reshape(out, experts, inner).permute(1, 0, 2)
    if layout == "experts_t":
        experts, inner, out = shape
        return delta.reshape(out, experts, inner).permute(1, 2, 0)
    return delta


def from_param(param: torch.Tensor, layout: str) -> torch.Tensor:
    """The matrix ``W [out, in]`` a parameter stores in ``layout`` (the inverse of :func:`to_param`)."""
    if layout == "conv1d":
        return param.t()
    if layout == "experts":
        experts, out, inner = param.shape
        return param.permute(1, 0, 2).reshape(out, experts * inner)
    if layout == "experts_t":
        experts, inner, out = param.shape
        return param.permute(2, 0, 1).reshape(out, experts * inner)
    return param


# -----------------------------------------------------------------------------
# devices: plain models and models dispatched by accelerate (device_map, CPU / disk offload)
#
# ``accelerate.dispatch_model`` (and ``from_pretrained(device_map=...)``) gives each module an
# ``AlignDevicesHook`` whose ``execution_device`` is where the module computes. Offloaded modules keep
# their parameters on the ``meta`` device between forwards; the values live in the hook's
# ``weights_map`` (CPU tensors, or ``.dat`` / safetensors files on disk) and are loaded for each forward.
# The helpers below are the only code that knows this.


def _align_hooks(module: nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])  # a SequentialHook holds several


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its first
    parameter or buffer that holds data (``cpu`` for a module without any)."""
    for hook in _align_hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None and not isinstance(device, dict):
            return torch.device(device)
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the execution device of the token embedding on a dispatched model (which may
    be offloaded), else the device of the model's first parameter."""
    if getattr(model, "hf_device_map", None) is not None or _align_hooks(model):
        try:
            return execution_device(get_module(model, get_architecture(model).embed))
        except (UnsupportedArchitectureError, InvalidConfigError):
            pass
    return next(model.parameters()).device


def _offload_slot(model: nn.Module, name: str) -> tuple[Any, str] | None:
    """``(storage, key)`` where accelerate keeps the values of parameter ``name`` of an offloaded module
    (the hook on the module itself, or on an ancestor that places its submodules), else None."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        for hook in _align_hooks(owner):
            weights = getattr(hook, "weights_map", None)
            if not getattr(hook, "offload", False) or weights is None:
                continue
            if depth < len(parts) - 1 and not getattr(hook, "place_submodules", False):
                continue
            key = ".".join(parts[depth:])
            while hasattr(weights, "dataset") and hasattr(weights, "prefix"):  # accelerate's PrefixedDataset
                weights, key = weights.dataset, weights.prefix + key
            if isinstance(getattr(weights, "state_dict", None), dict) or isinstance(weights, dict):
                return weights, key
            raise DeviceMapError(
                f"{name}: accelerate offloads it to a {type(weights).__name__}, which hf_knowedit cannot "
                "update. Dispatch the model with accelerate's dispatch_model / from_pretrained(device_map=..., "
                "offload_folder=...), or keep this module resident (device_map entry 'cpu' or a GPU)."
            )
    return None


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_path, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_path), attr)


def read_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The values of parameter or buffer ``name`` (e.g. ``"model.layers.3.mlp.down_proj.weight"``):
    the tensor itself, or for a module accelerate offloaded (``meta`` between forwards) the tensor it
    loads for a forward, on the storage's device (CPU). Treat the result as read-only."""
    tensor = _tensor(model, name)
    if tensor.device.type != "meta":
        return tensor
    slot = _offload_slot(model, name)
    if slot is None:
        raise DeviceMapError(
            f"{name} is on the meta device and no accelerate offload hook holds its values, so it cannot be "
            "read or edited. Load the model with its weights (from_pretrained with device_map=... and "
            "offload_folder=..., or accelerate.dispatch_model), not on the meta device."
        )
    storage, key = slot
    return (storage.state_dict if key in getattr(storage, "state_dict", {}) else storage)[key]


def stage_tensor(model: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """What :func:`write_tensor` stores for ``value`` (same shape and dtype as parameter ``name``): for a
    module accelerate offloaded, a private CPU copy (its loader keeps the tensor itself); else ``value``,
    which is copied into the parameter in place. Staging is where a write allocates: stage first, then
    ``write_tensor(..., staged=True)`` allocates no tensor."""
    if _offload_slot(model, name) is None:
        return value
    return value.detach().to("cpu").clone()


def saved_tensor(model: nn.Module, name: str, equal_to: torch.Tensor | None = None) -> torch.Tensor:
    """The current values of parameter ``name``, staged (see :func:`stage_tensor`), so that
    ``write_tensor(..., staged=True)`` puts them back bit for bit. For an offloaded module that is the
    loader's entry itself (writes replace entries, never change them); for a resident one a copy, or
    ``equal_to`` (a tensor on the parameter's device known to hold exactly its current values)."""
    if _offload_slot(model, name) is not None:
        return read_tensor(model, name)
    return equal_to if equal_to is not None else _tensor(model, name).detach().clone()


def write_tensor(model: nn.Module, name: str, value: torch.Tensor, *, staged: bool = False) -> None:
    """Set parameter ``name`` to ``value`` (same shape and dtype) in place. For an offloaded module the
    value replaces what accelerate loads for each forward (held in its loader's CPU state dict, so the
    offload files on disk are never written). ``staged=True``: ``value`` comes from :func:`stage_tensor`
    (or :func:`saved_tensor`) and is stored as it is, so the write allocates no tensor."""
    if not staged:
        value = stage_tensor(model, name, value)
    tensor = _tensor(model, name)
    slot = _offload_slot(model, name)
    if slot is not None:
        storage, key = slot
        target = storage.state_dict if isinstance(getattr(storage, "state_dict", None), dict) else storage
        target[key] = value
    if tensor.device.type != "meta":
        with torch.no_grad():
            tensor.copy_(value)
    elif slot is None:
        read_tensor(model, name)  # raises the DeviceMapError


def check_dispatch(model: nn.Module, params: Sequence[str] = ()) -> None:
    """Refuse, before anything is computed or written, a dispatched model the library cannot work on:
    a ``hf_device_map`` entry that is not a device (``"cuda:0,1"``), or a parameter on the meta device
    with no accelerate offload storage behind it (``params``: parameters that must be readable, e.g. the
    :func:`edited_param` of each edited module).
    The error names the module."""
    for module, device in (getattr(model, "hf_device_map", None) or {}).items():
        if device in ("disk", "meta"):
            continue
        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError) as err:
            raise DeviceMapError(
                f"device_map puts {module or '<model>'!r} on {device!r}, which is not one device ({err}). "
                "Give each module one device: an int GPU index, 'cuda:1', 'cpu' or 'disk' (device_map='auto' "
                "spreads the model over all GPUs)."
            ) from None
    for name, param in model.named_parameters():
        if param.device.type == "meta" and _offload_slot(model, name) is None:
            read_tensor(model, name)  # raises the DeviceMapError naming it
    for name in params:
        read_tensor(model, name)


def decoder_config(model_or_config: Any, spec: ArchitectureSpec | None = None) -> Any:
    """The config holding the text decoder's settings: ``config.<spec.text_config>`` for a multimodal wrapper
    (its ``text_config``), else the model's config itself. ``model_or_config``: a model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    spec = spec if spec is not None else get_architecture(config)
    if spec.text_config is None:
        return config
    sub = getattr(config, spec.text_config, None)
    if sub is None:
        raise InvalidConfigError(
            f"{type(config).__name__} has no {spec.text_config!r}, where the architecture table says "
            f"{spec.model_type!r} keeps its text decoder's config; load the model with its full config, or "
            "correct the table's text_config for this model type (register_architecture)."
        )
    return sub


def config_setting(model: nn.Module, spec: ArchitectureSpec, column: str) -> float | None:
    """The value of the decoder-config attribute that the table's ``column`` (e.g. ``"logit_divisor"``) names,
    or None where the column is None or the attribute is unset. ``"name[i]"`` reads entry ``i`` of a list
    attribute (Falcon-H1's ``mlp_multipliers[1]``); a shorter list raises
    :class:`~hf_knowedit.errors.InvalidConfigError`."""
    ref = getattr(spec, column)
    if ref is None:
        return None
    name, index = _SETTING_RE.match(ref).groups()
    value = getattr(decoder_config(model, spec), name, None)
    if index is None or value is None:
        return value
    if not isinstance(value, (list, tuple)) or int(index) >= len(value):
        raise InvalidConfigError(
            f"The architecture table's {column} for {spec.model_type!r} reads {ref!r}, but config.{name} is "
            f"{value!r}; correct the config, or the table's {column} (register_architecture)."
        )
    return value[int(index)]


def residual_scale(model: nn.Module, spec: ArchitectureSpec) -> float:
    """What each block multiplies its MLP output by before the residual add (``spec.residual_multiplier``;
    1.0 without one)."""
    value = config_setting(model, spec, "residual_multiplier")
    return 1.0 if value is None else float(value)


def lm_logits(model: nn.Module, spec: ArchitectureSpec, hidden_states: torch.Tensor) -> torch.Tensor:
    """Next-token logits from final hidden states, as the model makes them: the table's ``lm_head``, then
    the model's logit scaling (times ``spec.logit_scale``, Command-R; divided by ``spec.logit_divisor``,
    Granite), then the soft-cap ``cap · tanh(logits / cap)`` where ``spec.logit_softcap`` names a set config
    attribute (Gemma 2). Settings are read from :func:`decoder_config`.

    The one place logits are made from hidden states, so callers can run the backbone alone and
    apply the head only at the positions they read.
    """
    logits = get_module(model, spec.lm_head)(hidden_states)
    scale = config_setting(model, spec, "logit_scale")
    if scale is not None:
        logits = logits * scale
    divisor = config_setting(model, spec, "logit_divisor")
    if divisor is not None:
        logits = logits / divisor
    cap = config_setting(model, spec, "logit_softcap")
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits
