"""Tiny random-weight models, one per registered family, built from transformers configs (no download).

The configs vary what real checkpoints vary: head_dim different from hidden/heads, GQA ratios
1 (MHA), 2-4 and all heads sharing one K/V (MQA), hidden sizes that are not multiples of 128,
tied and untied heads, biases on and off. Two layers, hidden 48 or so, vocabulary 96.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers as t

VOCAB = 96
IMAGE = 16

_DECODER = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
_ENCODER = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, pad_token_id=0)


def _configs() -> dict[str, Any]:
    d = _DECODER
    return {
        # head_dim 16 != 48/4; MQA (all four heads share one K/V); tied head
        "llama": t.LlamaConfig(**d, hidden_size=48, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                               intermediate_size=40, tie_word_embeddings=True),
        # MHA (GQA ratio 1), hidden 40, untied
        "mistral": t.MistralConfig(**d, hidden_size=40, num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=56, sliding_window=None),
        "mixtral": t.MixtralConfig(**d, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
        # GQA ratio 3 (6 heads, 2 K/V), Q/K/V biases (the family's default), tied
        "qwen2": t.Qwen2Config(**d, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                               intermediate_size=40, tie_word_embeddings=True),
        # GQA ratio 4, head_dim 16 != 56/4, attention biases switched on
        "qwen3": t.Qwen3Config(**d, hidden_size=56, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                               intermediate_size=40, attention_bias=True, tie_word_embeddings=False),
        "qwen3_moe": t.Qwen3MoeConfig(**d, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                                      num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
        # fused qkv_proj and gate_up_proj, GQA ratio 2
        "phi3": t.Phi3Config(**d, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=40, tie_word_embeddings=False),
        "gemma2": t.Gemma2Config(**d, hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 intermediate_size=40, sliding_window=8),
        "gemma3_text": t.Gemma3TextConfig(**d, hidden_size=48, num_attention_heads=4, num_key_value_heads=1,
                                          head_dim=16, intermediate_size=40, sliding_window=8),
        "gpt2": t.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=1, eos_token_id=2),
        "gpt_neox": t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=40, max_position_embeddings=64, rotary_pct=0.5,
                                    bos_token_id=1, eos_token_id=2),
        "olmo2": t.Olmo2Config(**d, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=40),
        "granite": t.GraniteConfig(**d, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=40, embedding_multiplier=2.0, residual_multiplier=0.5,
                                   attention_multiplier=0.2, logits_scaling=4.0),
        "bert": t.BertConfig(**_ENCODER, hidden_size=48, num_attention_heads=4, intermediate_size=40,
                             type_vocab_size=2),
        "roberta": t.RobertaConfig(**_ENCODER, hidden_size=48, num_attention_heads=4, intermediate_size=40,
                                   type_vocab_size=1),
        "distilbert": t.DistilBertConfig(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=4, hidden_dim=40,
                                         max_position_embeddings=64),
        "modernbert": t.ModernBertConfig(**_ENCODER, hidden_size=48, num_attention_heads=4, intermediate_size=40,
                                         bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
        "vit": t.ViTConfig(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=40, num_labels=5),
        "resnet": t.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                 layer_type="basic", num_labels=5),
    }


CONFIGS = _configs()
FAMILIES = tuple(CONFIGS)
_CLASSES = {"causal-lm": t.AutoModelForCausalLM, "encoder": t.AutoModel, "vision": t.AutoModelForImageClassification}


def build(family: str) -> Any:
    """The family's tiny model, every parameter perturbed so no two tensors are equal (norms start as ones)."""
    from optc.architectures import lookup

    config = CONFIGS[family]
    task = lookup(config.model_type).task
    torch.manual_seed(0)
    model = _CLASSES[task].from_config(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        for buffer_name, buffer in model.named_buffers():  # BatchNorm statistics
            if buffer_name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5, generator=generator)
            elif buffer_name.endswith("running_mean"):
                buffer.normal_(0, 0.1, generator=generator)
    return model.eval()


def save(family: str, folder: Path) -> tuple[Any, Path]:
    """Build the family's model and save it as a Hugging Face directory (no tokenizer)."""
    model = build(family)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return model, folder


def feeds(task: str, input_names: list[str], batch: int = 2, seq: int = 9, seed: int = 0) -> dict[str, Any]:
    """Inputs for onnxruntime (numpy), as the exported model names them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if task == "vision":
        return {"pixel_values": rng.standard_normal((batch, 3, IMAGE, IMAGE)).astype(np.float32)}
    out = {"input_ids": rng.integers(3, VOCAB, size=(batch, seq), dtype=np.int64)}
    if "attention_mask" in input_names:
        mask = np.ones((batch, seq), np.int64)
        mask[-1, seq // 2:] = 0
        out["attention_mask"] = mask
    if "token_type_ids" in input_names:
        out["token_type_ids"] = np.zeros((batch, seq), np.int64)
    return out


def reference(model: Any, task: str, inputs: dict[str, Any]) -> Any:
    """transformers' output for `inputs` (logits, or the last hidden state of an encoder), as numpy."""
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        if task == "causal-lm":
            return model(**tensors, use_cache=False).logits.numpy()
        if task == "vision":
            return model(**tensors).logits.numpy()
        return model(**tensors).last_hidden_state.numpy()
