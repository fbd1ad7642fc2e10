"""Tiny random Hugging Face llama models with a byte-level BPE tokenizer, for the GGUF backend's tests.

`hidden=256` so that k-quants apply to rows of `hidden` elements, and
`intermediate=320` so that `ffn_down` rows (320) need llama-quantize's fallback types.
"""

from __future__ import annotations

import functools

TEXT = "The capital of France is Paris. The quick brown fox jumps over the lazy dog. 0123456789 " * 8


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A GPT-2 style byte-level BPE tokenizer trained on a sentence (about 310 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )


@functools.lru_cache(maxsize=4)
def tiny_hf_llama(*, kind: str = "llama", layers: int = 2, tied: bool = True, seed: int = 0, rope: str = "default"):
    """(HF model, tokenizer): a random tiny llama/mistral in memory (norms and weights made non-trivial; cached, do not modify)."""
    import torch
    import transformers

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=320, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=tied,
    )
    if kind == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=10000.0)
        if rope == "llama3":
            config.rope_parameters = {
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            }
        model = transformers.LlamaForCausalLM(config)
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, use_sliding_window=False))
    else:
        raise AssertionError(kind)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.mul_(3.0)
    return model.eval(), tokenizer


def ir_like_frontend(hf_model, tokenizer):
    """An optc IR holding the HF model's parameters the way the transformers frontend records them.

    The graph is a simplified decoder (no attention, no rope): every parameter
    is an initializer read by the op the real export reads it with (Linear
    weights stored transposed `[in, out]` and annotated `source_transposed`,
    norms multiplied in, the embedding gathered and, when tied, transposed
    into the output MatMul), so weighted ops see real activations; the model
    metadata (HF config, architecture, tokenizer, tied parameters) is the
    frontend's. It runs in onnxruntime (input `input_ids`, output `logits`).
    """
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from optc.frontends.transformers import SOURCE_ALIASES, SOURCE_TRANSPOSED, TIED_PARAMETERS
    from optc.ir import (
        DEFAULT_IR_VERSION,
        DEFAULT_OPSET,
        annotate,
        from_proto,
        set_model_metadata,
        set_source_name,
    )
    from optc.ir.annotations import ARCHITECTURE, HF_CONFIG
    from optc.runtime.tokenizer import store_tokenizer

    state = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    cfg = hf_model.config
    tied = bool(cfg.tie_word_embeddings)
    inits, nodes = [], []
    sources: dict[str, tuple[str, bool]] = {}

    def weight(param: str, transposed: bool) -> str:
        name = f"w{len(inits)}"
        array = state[param].T if transposed else state[param]
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        sources[name] = (param, transposed)
        return name

    def op(kind: str, inputs: list[str], **attrs) -> str:
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    embed = weight("model.embed_tokens.weight", False)
    h = op("Gather", [embed, "input_ids"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = op("Mul", [h, weight(p + "input_layernorm.weight", False)])
        q, k, v = (op("MatMul", [x, weight(p + f"self_attn.{n}_proj.weight", True)]) for n in "qkv")
        if p + "self_attn.q_proj.bias" in state:
            q, k, v = (op("Add", [t, weight(p + f"self_attn.{n}_proj.bias", False)]) for t, n in zip((q, k, v), "qkv", strict=True))
        kv = op("Add", [k, v])
        mixed = op("Add", [q, op("Concat", [kv, kv], axis=-1)])
        h = op("Add", [h, op("MatMul", [op("Tanh", [mixed]), weight(p + "self_attn.o_proj.weight", True)])])
        x = op("Mul", [h, weight(p + "post_attention_layernorm.weight", False)])
        gate = op("MatMul", [x, weight(p + "mlp.gate_proj.weight", True)])
        up = op("MatMul", [x, weight(p + "mlp.up_proj.weight", True)])
        h = op("Add", [h, op("MatMul", [op("Mul", [op("Tanh", [gate]), up]), weight(p + "mlp.down_proj.weight", True)])])
    x = op("Mul", [h, weight("model.norm.weight", False)])
    head = op("Transpose", [embed], perm=[1, 0]) if tied else weight("lm_head.weight", True)
    nodes.append(helper.make_node("MatMul", [x, head], ["logits"]))
    graph = helper.make_graph(
        nodes, "tiny-llama-like",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)], ir_version=DEFAULT_IR_VERSION)
    onnx.checker.check_model(proto)
    model = from_proto(proto)
    for name, (param, transposed) in sources.items():
        value = model.graph.initializers[name]
        set_source_name(value, param)
        if transposed:
            annotate(value, SOURCE_TRANSPOSED, True)
        if tied and param == "model.embed_tokens.weight":
            annotate(value, SOURCE_ALIASES, ["lm_head.weight"])
    config = json.loads(json.dumps(cfg.to_dict(), default=str))
    config.setdefault("architectures", [type(hf_model).__name__])
    set_model_metadata(model, HF_CONFIG, config)
    set_model_metadata(model, ARCHITECTURE, type(hf_model).__name__)
    set_model_metadata(model, TIED_PARAMETERS, {"lm_head.weight": "model.embed_tokens.weight"} if tied else {})
    store_tokenizer(model, tokenizer)
    return model
