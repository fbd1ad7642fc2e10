"""What optc knows about one model family: `Family` (and `GGUFLayout`, the tensor names llama.cpp uses)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal

Task = Literal["causal-lm", "encoder", "vision"]
Norm = Literal["rmsnorm", "layernorm", "batchnorm"]
#: The metadata key of a structural trait's short word (`Family.variants`).
TRAIT = "trait"


def trait(word: str, default: bool = False) -> Any:
    """A structural yes/no of a family, named `word` in `Family.variants` where a family differs from `default`."""
    return field(default=default, metadata={TRAIT: word})


@dataclass(frozen=True)
class GGUFLayout:
    """How optc's GGUF writer names and lays out a family's tensors (llama.cpp's names).

    `layer_names` maps a parameter's name inside one decoder layer
    (`self_attn.q_proj.weight`) to its GGUF name inside the block (`attn_q.weight`),
    `global_names` whole parameter names to GGUF names; `layer_order` is the
    order convert_hf_to_gguf.py writes a block's tensors in; `required` the
    optional tensors (biases) llama.cpp's loader insists on for this architecture.
    `split` names the fused parameters written as two tensors (the first and
    second half of the rows: a fused expert `gate_up_proj` becomes
    `ffn_gate_exps` and `ffn_up_exps`); `hparams` the architecture's own
    metadata keys (after `<arch>.`) and the Hugging Face config key each comes
    from (a float is written FLOAT32, an int UINT32; a key the config lacks or
    holds as null is left out); `norm_offset` what convert_hf_to_gguf.py adds to
    every norm weight (gemma's `1 + w` RMSNorm: 1). `fixed` holds the config
    values llama.cpp assumes for the architecture (it reads no key for them),
    `head_dim_keys` the config keys llama.cpp takes to equal the head size
    (gemma's `query_pre_attn_scalar`): a config that differs is refused.
    `config_keys` names the config's own keys for optc's standard ones
    (gpt2's `n_embd` for `hidden_size`); `layer_norm` says the norms are
    LayerNorms (epsilon written as `attention.layer_norm_epsilon`);
    `transposed` the parameters (inside a layer) Hugging Face stores `[in, out]`
    (gpt2's Conv1D), written `[out, in]`; `qkv_per_head` the fused projections
    whose rows interleave each head's Q, K and V (gpt_neox's `query_key_value`,
    `[head, 3, head_dim]`), written as all Q rows, then K, then V.
    `leading_names` are global tensors written right after `token_embd`
    (gpt2's `position_embd`). `full_attention` says llama.cpp runs every layer
    with full attention whatever the file says (phi3: its sliding window is
    disabled), so a window shorter than the context is refused.
    """

    arch: str
    layer_names: Mapping[str, str]
    global_names: Mapping[str, str]
    layer_order: tuple[str, ...]
    #: llama.cpp's "normal" rope pairs consecutive values: Q/K rows are permuted from HF's rotate-half.
    permute_qk: bool = False
    required: tuple[str, ...] = ()
    layer_prefix: str = "model.layers."
    split: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    hparams: Mapping[str, str] = field(default_factory=dict)
    norm_offset: float = 0.0
    fixed: Mapping[str, object] = field(default_factory=dict)
    head_dim_keys: tuple[str, ...] = ()
    config_keys: Mapping[str, str] = field(default_factory=dict)
    layer_norm: bool = False
    transposed: tuple[str, ...] = ()
    qkv_per_head: tuple[str, ...] = ()
    leading_names: tuple[str, ...] = ()
    full_attention: bool = False

    def __post_init__(self) -> None:
        for name in ("layer_names", "global_names", "split", "hparams", "fixed", "config_keys"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))


@dataclass(frozen=True)
class Family:
    """One model family: what the frontend accepts, its structural variants, GGUF layout, default float layers.

    The structural fields describe the family's usual checkpoints (a config can
    still switch biases or tying); passes match structure in the graph, and read
    these only to say what they met and to choose defaults.
    """

    name: str
    #: Hugging Face `model_type`s this family accepts.
    model_types: tuple[str, ...]
    task: Task
    #: One projection computes Q, K and V (phi3 `qkv_proj`, gpt2 `c_attn`, gpt_neox `query_key_value`).
    fused_qkv: bool = trait("fused-qkv")
    #: One projection computes the gate and up halves of a gated MLP (phi3 `gate_up_proj`).
    fused_gate_up: bool = trait("fused-gate-up")
    attention_bias: bool = trait("attn-bias")
    mlp_bias: bool = trait("mlp-bias")
    #: Attention and MLP read the same normalized input and add into the residual together (gpt_neox, gpt-j).
    parallel_blocks: bool = trait("parallel")
    #: SwiGLU/GeGLU (act(gate) * up) rather than a plain up → act → down MLP.
    gated_mlp: bool = trait("plain-mlp", default=True)
    norm: Norm = "rmsnorm"
    #: The norm multiplies by (1 + weight) (gemma).
    norm_offset: bool = trait("norm+1")
    #: Token embeddings are multiplied by sqrt(hidden) (gemma).
    embedding_scale: bool = trait("emb-scale")
    #: The output head shares the token embedding by default.
    tied_head: bool = trait("tied")
    sliding_window: bool = trait("sliding-window")
    #: RMSNorm on each head's queries and keys (qwen3, olmo2 over the whole projection, gemma3).
    qk_norm: bool = trait("qk-norm")
    #: Mixture of experts MLPs (a router and per-expert projections).
    moe: bool = trait("moe")
    #: llama.cpp's name for the family (`general.architecture`), when llama.cpp runs it.
    gguf_arch: str | None = None
    #: What optc's GGUF writer needs to write it; None when optc does not write this family yet.
    gguf: GGUFLayout | None = None
    #: The config key holding the length of a learned position table (gpt2 `n_positions`, bert
    #: `max_position_embeddings`): no input may be longer; None for rotary or no positions.
    position_table: str | None = None
    #: The config key whose value + 1 the position ids start at (roberta's `pad_token_id`), shortening the table.
    position_offset_key: str | None = None
    #: onnxruntime-genai's model type (`genai_config.json`), when it runs the family's KV-cache decoder.
    genai_type: str | None = None
    #: Layer name patterns the quantizers leave in float by default (the output head, routers).
    keep_float: tuple[str, ...] = ("lm_head",)
    #: Name patterns of the embedding tables (structural passes leave them alone by default).
    embeddings: tuple[str, ...] = ("embed",)
    #: Free-form notes on what optc does not handle in this family yet.
    notes: tuple[str, ...] = field(default=())

    @property
    def variants(self) -> tuple[str, ...]:
        """The structural variants this family has, as short words (for tables and remarks): its norm, and the word
        of each trait it has away from the usual decoder's."""
        departures = (f.metadata[TRAIT] for f in fields(self) if TRAIT in f.metadata and getattr(self, f.name) != f.default)
        return (self.norm, *departures)
