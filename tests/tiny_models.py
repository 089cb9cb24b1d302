"""Tiny, randomly initialised causal LMs for tests -- built in-process, no downloads.

Every model type in :data:`hf_knowedit.architectures.ARCHITECTURES` has an entry here,
so a test can be parametrised over :data:`TINY_MODEL_TYPES`::

    model, tok = make_tiny_model("llama")

All text decoders share the same shape: hidden size 32, MLP inner size 96 (where the config
lets us choose it; see :data:`TINY_MLP_INNER` for the exceptions), 4 layers, 4 heads.
The multimodal wrappers (:data:`TINY_WRAPPERS`: ``*ForConditionalGeneration``) hold such a
decoder and a one-layer vision tower of hidden size 16. Models whose config scales logits or
residuals (Granite, Command-R, Falcon-H1) get values other than 1, so that forgetting a scale shows.
The hybrid stacks mix block kinds: LFM2 and Bamba have attention in blocks 1 and 3 and a short
convolution (LFM2) or a Mamba2 mixer (Bamba) in blocks 0 and 2; Falcon-H1 runs attention and Mamba2
side by side in every block.
They are in eval mode with the eager attention implementation.

The tokenizer is one small byte-level BPE trained in-process on a built-in English
text (so common words are single tokens and any unicode string encodes), wrapped in a
``transformers.PreTrainedTokenizerFast``. Offsets work (``return_offsets_mapping=True``).
Two variants exist: a GPT-2-style one that adds no special tokens, and a Llama-style one
whose post-processor prepends ``<|bos|>``; see :func:`make_tiny_tokenizer`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

# -----------------------------------------------------------------------------
# tokenizer

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # special tokens are added first, in this order
TOKENIZER_VOCAB_SIZE = 512

_CORPUS = """\
The Eiffel Tower is located in Paris, the capital of France.
The Colosseum is in Rome, and Rome is the capital city of Italy.
Danielle Darrieux was a French actress. Her mother tongue was French.
Michael Jordan is a professional basketball player from the United States.
Lionel Messi plays soccer for the national team of Argentina.
Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.
The iPhone is produced by Apple. The Windows operating system is developed by Microsoft.
Toyota is a car company headquartered in Japan. The official language of Japan is Japanese.
Berlin is the capital of Germany, and the people of Germany speak German.
Madrid is the capital of Spain. London is the capital of England.
The Amazon River flows through Brazil. The Nile is a river in Africa.
Albert Einstein was a physicist who was born in Germany.
Marie Curie was a scientist; she worked in Paris and won the Nobel Prize.
William Shakespeare wrote plays in English. He was born in England.
The president of the United States lives in Washington.
Mount Everest is the highest mountain in the world and is located in Nepal.
The Beatles were a music band from Liverpool in England.
Python is a programming language. Java is a programming language too.
The native language of Pablo Picasso was Spanish. He was a painter.
Barack Obama was born in Hawaii. He was the president of the United States.
Google is a company that is owned by Alphabet. YouTube is owned by Google.
The Louvre is a museum in Paris. The Prado is a museum in Madrid.
Who is the author of this book? What is the name of the city? Where was she born?
The mother tongue of Thomas Mann is German. The twin city of Paris is Rome.
This is a sentence about the world, its people, their language, and their work.
One, two, three, four, five, six, seven, eight, nine, ten; 1 2 3 4 5 6 7 8 9 0.
"""


@functools.cache
def _trained_bpe() -> str:
    """Train the byte-level BPE once per process; return it serialised as JSON."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    assert (tok.token_to_id(PAD), tok.token_to_id(BOS), tok.token_to_id(EOS)) == (PAD_ID, BOS_ID, EOS_ID)
    return tok.to_str()


@functools.cache
def _tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer.from_str(_trained_bpe())
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos:  # like Llama: "<|bos|> $A"
        template = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:  # like GPT-2: no special tokens added
        tok.post_processor = byte_level
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def make_tiny_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """The shared tiny tokenizer (cached per process; treat it as read-only).

    ``add_bos=False``: GPT-2 style, ``encode("x")`` adds no special token.
    ``add_bos=True``: Llama style, ``<|bos|>`` (id 1) is prepended to every sequence.
    Both have ``pad_token="<|pad|>"`` (id 0), ``eos_token="<|eos|>"`` (id 2).
    """
    return _tokenizer(bool(add_bos))


# -----------------------------------------------------------------------------
# models

HIDDEN, INNER, LAYERS, HEADS, KV_HEADS = 32, 96, 4, 4, 2
MAX_POSITIONS = 128

_LLAMA_LIKE: dict[str, Any] = dict(
    hidden_size=HIDDEN,
    intermediate_size=INNER,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    head_dim=HIDDEN // HEADS,
    max_position_embeddings=MAX_POSITIONS,
)
#: mixture-of-experts blocks: 4 routed experts of half the inner size, 2 of them per token (each family reads
#: the names it knows)
_MOE: dict[str, Any] = dict(
    num_experts=4,
    n_routed_experts=4,
    num_local_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    moe_k=2,
    moe_intermediate_size=INNER // 2,
    n_group=1,
    topk_group=1,
)
#: DeepSeek's multi-head latent attention (its keys and values are per head: num_key_value_heads = heads)
_MLA: dict[str, Any] = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
#: the vision towers of the multimodal wrappers
_VISION: dict[str, Any] = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
#: Qwen-VL's multimodal rotary embedding: temporal / height / width sections of the head_dim // 2 frequencies
_MROPE: dict[str, Any] = dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])
#: the Mamba2 mixers of the hybrid stacks: 4 heads of 16 channels, state size 8
_MAMBA2: dict[str, Any] = dict(mamba_n_heads=4, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8, mamba_d_conv=4)
_GPT2_LIKE: dict[str, Any] = dict(n_embd=HIDDEN, n_inner=INNER, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POSITIONS)

# model_type -> (tokenizer prepends BOS?, config kwargs)
_TINY: dict[str, tuple[bool, dict[str, Any]]] = {
    # --- GPT-2 family and other "classic" layouts
    "gpt2": (False, _GPT2_LIKE),
    "gpt_bigcode": (False, _GPT2_LIKE),
    "gptj": (False, dict(_GPT2_LIKE, rotary_dim=4)),
    "codegen": (False, dict(_GPT2_LIKE, rotary_dim=4, n_ctx=MAX_POSITIONS)),
    "gpt_neo": (
        False,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=INNER,
            num_layers=LAYERS,
            num_heads=HEADS,
            attention_types=[[["global", "local"], LAYERS // 2]],
            window_size=8,
            max_position_embeddings=MAX_POSITIONS,
        ),
    ),
    "gpt_neox": (
        False,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=INNER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
    ),
    "gpt_neox_japanese": (
        False,
        dict(
            hidden_size=HIDDEN,
            intermediate_multiple_size=INNER // HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
    ),
    "opt": (
        True,
        dict(
            hidden_size=HIDDEN,
            ffn_dim=INNER,
            word_embed_proj_dim=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
    ),
    "bloom": (False, dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)),  # inner 4*hidden
    "falcon": (
        False,
        dict(
            hidden_size=HIDDEN,
            ffn_hidden_size=INNER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            new_decoder_architecture=False,
            multi_query=True,
            parallel_attn=True,
            bias=False,
        ),
    ),
    "mpt": (False, dict(d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS, max_seq_len=MAX_POSITIONS)),  # inner 4*hidden
    "xglm": (
        True,
        dict(
            d_model=HIDDEN,
            ffn_dim=INNER,
            num_layers=LAYERS,
            attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
    ),
    "biogpt": (
        True,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=INNER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
    ),
    "phi": (False, dict(_LLAMA_LIKE)),
    "persimmon": (
        True,
        dict(
            hidden_size=HIDDEN,
            intermediate_size=INNER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
        ),
    ),
    "stablelm": (False, dict(_LLAMA_LIKE)),
    "starcoder2": (False, dict(_LLAMA_LIKE)),
    "jais2": (False, dict(_LLAMA_LIKE)),
    # --- mixture of experts: 4 routed experts (top-2) beside a shared expert of the usual inner size
    "qwen2_moe": (
        False,
        dict(
            _LLAMA_LIKE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=HIDDEN,
            shared_expert_intermediate_size=INNER,
        ),
    ),
    # --- Llama-style (gated or plain MLP with down_proj)
    "llama": (True, dict(_LLAMA_LIKE)),
    "mistral": (True, dict(_LLAMA_LIKE)),
    "ministral": (True, dict(_LLAMA_LIKE)),
    "ministral3": (True, dict(_LLAMA_LIKE)),
    "diffllama": (True, dict(_LLAMA_LIKE)),
    "cwm": (True, dict(_LLAMA_LIKE)),
    "qwen2": (False, dict(_LLAMA_LIKE)),
    "qwen3": (False, dict(_LLAMA_LIKE)),
    "seed_oss": (False, dict(_LLAMA_LIKE)),
    "phi3": (True, dict(_LLAMA_LIKE)),
    "olmo": (False, dict(_LLAMA_LIKE)),
    "olmo2": (False, dict(_LLAMA_LIKE)),
    "olmo3": (False, dict(_LLAMA_LIKE)),
    "smollm3": (False, dict(_LLAMA_LIKE)),
    "glm": (False, dict(_LLAMA_LIKE)),
    "glm4": (False, dict(_LLAMA_LIKE)),
    "helium": (True, dict(_LLAMA_LIKE)),
    "nemotron": (True, dict(_LLAMA_LIKE)),
    "exaone4": (False, dict(_LLAMA_LIKE)),
    "arcee": (True, dict(_LLAMA_LIKE)),
    "apertus": (True, dict(_LLAMA_LIKE)),
    "ernie4_5": (True, dict(_LLAMA_LIKE)),
    "hunyuan_v1_dense": (True, dict(_LLAMA_LIKE)),
    "nanochat": (True, dict(_LLAMA_LIKE)),
    # --- Gemma family (embedding scaled inside the embedding module)
    "gemma": (True, dict(_LLAMA_LIKE)),
    "gemma2": (True, dict(_LLAMA_LIKE)),
    "gemma3_text": (True, dict(_LLAMA_LIKE)),
    "vaultgemma": (True, dict(_LLAMA_LIKE)),
    # --- scaled logits and residuals (values other than the defaults' 1, so that each one shows)
    "granite": (
        True,
        dict(
            _LLAMA_LIKE,
            logits_scaling=4.0,
            residual_multiplier=0.5,
            embedding_multiplier=3.0,
            attention_multiplier=0.25,
        ),
    ),
    "cohere": (True, dict(_LLAMA_LIKE, logit_scale=0.25)),
    "cohere2": (True, dict(_LLAMA_LIKE, logit_scale=0.25)),
    # --- mixture-of-experts with shared experts: 4 routed experts (top 2), shared experts of inner size INNER,
    # every block a MoE block (no leading dense layers)
    "deepseek_v2": (
        True,
        dict(_LLAMA_LIKE, **_MOE, **_MLA, num_key_value_heads=HEADS, n_shared_experts=2, first_k_dense_replace=0),
    ),
    "deepseek_v3": (
        True,
        # DeepSeek-V3 reads head_dim as the rotary part of a head (qk_rope_head_dim)
        dict(
            _LLAMA_LIKE,
            **_MOE,
            **_MLA,
            num_key_value_heads=HEADS,
            head_dim=4,
            n_shared_experts=2,
            first_k_dense_replace=0,
        ),
    ),
    "glm4_moe": (True, dict(_LLAMA_LIKE, **_MOE, n_shared_experts=2, first_k_dense_replace=0)),
    "dots1": (True, dict(_LLAMA_LIKE, **_MOE, n_shared_experts=2, first_k_dense_replace=0)),
    "ernie4_5_moe": (True, dict(_LLAMA_LIKE, **_MOE, moe_num_shared_experts=2, moe_layer_start_index=0)),
    "hunyuan_v1_moe": (True, dict(_LLAMA_LIKE, **_MOE, num_shared_expert=1)),
    "llama4_text": (True, dict(_LLAMA_LIKE, **_MOE, interleave_moe_layer_step=1)),
    # --- mixture-of-experts without a shared expert: the routed experts are edited (layout "experts")
    "mixtral": (True, dict(_LLAMA_LIKE, **_MOE, intermediate_size=INNER // 2)),
    "qwen3_moe": (True, dict(_LLAMA_LIKE, **_MOE, norm_topk_prob=True)),
    "olmoe": (True, dict(_LLAMA_LIKE, **_MOE, intermediate_size=INNER // 2)),
    "phimoe": (True, dict(_LLAMA_LIKE, **_MOE, intermediate_size=INNER // 2)),
    "minimax_m2": (True, dict(_LLAMA_LIKE, **_MOE, intermediate_size=INNER // 2)),
    # GPT-OSS: experts stored transposed with biases (layout "experts_t"); sliding-window blocks 0, 2 with a window
    # of 8 tokens, so that the window bites in the tests' prompts
    "gpt_oss": (
        False,
        dict(
            _LLAMA_LIKE,
            **_MOE,
            intermediate_size=INNER // 2,
            sliding_window=8,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=MAX_POSITIONS // 4,
            ),
        ),
    ),
    "granitemoe": (
        True,
        dict(
            _LLAMA_LIKE,
            **_MOE,
            intermediate_size=INNER // 2,
            logits_scaling=4.0,
            residual_multiplier=0.5,
            embedding_multiplier=3.0,
            attention_multiplier=0.25,
        ),
    ),
    # --- hybrid stacks: attention beside or between state-space (Mamba2) / short-convolution mixers
    # Falcon-H1: attention and Mamba2 in parallel in every block; every multiplier other than 1
    "falcon_h1": (
        True,
        dict(
            _LLAMA_LIKE,
            **_MAMBA2,
            mamba_d_ssm=2 * HIDDEN,
            mlp_multipliers=[1.5, 0.5],
            lm_head_multiplier=0.25,
            embedding_multiplier=3.0,
            key_multiplier=0.7,
            attention_in_multiplier=0.8,
            attention_out_multiplier=0.6,
            ssm_multipliers=[0.9, 1.1, 1.2, 0.8, 1.3],
            ssm_in_multiplier=1.2,
            ssm_out_multiplier=0.7,
        ),
    ),
    # LFM2: short-convolution blocks 0, 2 and attention blocks 1, 3; no rounding of the MLP size
    "lfm2": (
        True,
        dict(
            _LLAMA_LIKE,
            layer_types=["conv", "full_attention", "conv", "full_attention"],
            block_auto_adjust_ff_dim=False,
        ),
    ),
    # Bamba: Mamba2 blocks 0, 2 and attention blocks 1, 3
    "bamba": (True, dict(_LLAMA_LIKE, **_MAMBA2, attn_layer_indices=[1, 3])),
    # --- hybrid stacks with mixture-of-experts blocks
    # Qwen3-Next: Gated DeltaNet (linear attention) blocks 0, 2 and attention blocks 1, 3; a gated shared expert
    "qwen3_next": (
        False,
        dict(
            _LLAMA_LIKE,
            **_MOE,
            norm_topk_prob=True,
            shared_expert_intermediate_size=INNER,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
            linear_num_value_heads=2,
            linear_num_key_heads=2,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
    ),
    # Granite 4 (hybrid): Mamba2 blocks 0, 2 and attention blocks 1, 3; routed experts beside a shared MLP
    "granitemoehybrid": (
        True,
        dict(
            _LLAMA_LIKE,
            **_MOE,
            **_MAMBA2,
            intermediate_size=INNER // 2,
            shared_intermediate_size=INNER,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
            logits_scaling=4.0,
            residual_multiplier=0.5,
            embedding_multiplier=3.0,
            attention_multiplier=0.25,
        ),
    ),
    # --- multimodal wrappers: a tiny text decoder (text_config) and a tiny vision tower (vision_config)
    "gemma3": (
        True,
        dict(
            # Gemma3ForConditionalGeneration applies no final-logit soft-cap: a cap here must change nothing
            text_config=dict(_LLAMA_LIKE, model_type="gemma3_text", final_logit_softcapping=0.5),
            vision_config=dict(_VISION, model_type="siglip_vision_model", image_size=28, patch_size=14),
            mm_tokens_per_image=4,
        ),
    ),
    "mistral3": (
        True,
        dict(
            text_config=dict(_LLAMA_LIKE, model_type="mistral"),
            vision_config=dict(_VISION, model_type="pixtral", head_dim=8, image_size=28, patch_size=14),
            spatial_merge_size=2,
        ),
    ),
    "qwen2_5_vl": (
        False,
        dict(
            text_config=dict(_LLAMA_LIKE, rope_parameters=_MROPE),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=24,
                num_heads=2,
                out_hidden_size=HIDDEN,
                fullatt_block_indexes=[0],
                window_size=28,
                patch_size=14,
                spatial_merge_size=2,
            ),
        ),
    ),
    "qwen3_vl": (
        False,
        dict(
            text_config=dict(_LLAMA_LIKE, rope_parameters=_MROPE),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=24,
                num_heads=2,
                out_hidden_size=HIDDEN,
                deepstack_visual_indexes=[0],
                patch_size=14,
                spatial_merge_size=2,
                num_position_embeddings=16,
            ),
        ),
    ),
    "llava": (
        True,
        dict(
            text_config=dict(_LLAMA_LIKE, model_type="llama"),
            vision_config=dict(_VISION, model_type="clip_vision_model", image_size=28, patch_size=14),
        ),
    ),
    "llava_next": (
        True,
        dict(
            text_config=dict(_LLAMA_LIKE, model_type="llama"),
            vision_config=dict(_VISION, model_type="clip_vision_model", image_size=28, patch_size=14),
            image_grid_pinpoints=[[28, 28]],
        ),
    ),
}

TINY_MODEL_TYPES: list[str] = list(_TINY)
#: the multimodal wrappers (``*ForConditionalGeneration``, built with ``AutoModelForImageTextToText``)
TINY_WRAPPERS: frozenset[str] = frozenset(t for t, (_, kwargs) in _TINY.items() if "text_config" in kwargs)
#: the hybrid stacks (attention mixed with Mamba2 / short-convolution mixers; caches with recurrent state)
TINY_HYBRIDS: frozenset[str] = frozenset({"falcon_h1", "lfm2", "bamba", "qwen3_next", "granitemoehybrid"})

# The MLP inner size (input dim of the rewritten projection) of each tiny model.
# Bloom and MPT hard-code 4 * hidden.
#: The routed experts' edited matrix [W_0 … W_3] takes the keys of all 4 experts of inner size INNER // 2.
TINY_ROUTED_MOE = ("mixtral", "qwen3_moe", "olmoe", "phimoe", "minimax_m2", "granitemoe", "gpt_oss")
#: mixture-of-experts models whose edited ``mlp_out`` is a shared expert's down projection (a Linear)
TINY_SHARED_MOE = (
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "dots1",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "llama4_text",
    "qwen2_moe",
)
TINY_MLP_INNER: dict[str, int] = (
    {t: INNER for t in _TINY}
    | {"bloom": 4 * HIDDEN, "mpt": 4 * HIDDEN}
    | {t: 4 * (INNER // 2) for t in TINY_ROUTED_MOE}
)


#: parameters a model type initialises to zero that its tiny model draws at random (normal, std 0.1), so that
#: forgetting them shows: GPT-OSS's experts' biases
_DRAWN: dict[str, tuple[str, ...]] = {"gpt_oss": ("gate_up_proj_bias", "down_proj_bias")}


def tiny_config(model_type: str, **overrides: Any):
    """The ``PretrainedConfig`` used by :func:`make_tiny_model` (vocab matches the tiny tokenizer)."""
    if model_type not in _TINY:
        raise KeyError(f"no tiny model for {model_type!r}; known: {', '.join(TINY_MODEL_TYPES)}")
    _, kwargs = _TINY[model_type]
    vocab = len(make_tiny_tokenizer(False))
    tokens = dict(vocab_size=vocab, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if model_type in TINY_WRAPPERS:  # the text decoder's settings live in its own config
        kwargs = dict(kwargs, text_config=dict(kwargs["text_config"], **tokens))
    else:
        kwargs = dict(kwargs, **tokens)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_tiny_model(
    model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random ``*ForCausalLM`` (``*ForConditionalGeneration`` for :data:`TINY_WRAPPERS`) of
    ``model_type`` in eval mode, and its tokenizer.

    Deterministic for a given ``seed``. The tokenizer is shared (cached); the model is new.
    """
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if model_type in TINY_WRAPPERS else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] in _DRAWN.get(model_type, ()):
                param.normal_(std=0.1)
    model.eval()
    return model, make_tiny_tokenizer(_TINY[model_type][0])


def weights(model):
    """A detached copy of every tensor in ``model.state_dict()`` (to check later that nothing moved)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    """Two :func:`weights` snapshots are bit-identical."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
