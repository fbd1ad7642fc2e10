"""Mistral: LLaMA's layout with a sliding attention window; llama.cpp runs it as `llama`."""

from optc.architectures.family import Family
from optc.architectures.llama import GGUF

FAMILY = Family(name="mistral", model_types=("mistral",), task="causal-lm", sliding_window=True,
                gguf_arch="llama", gguf=GGUF, genai_type="mistral")
