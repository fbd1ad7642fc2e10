"""Greedy generation and its speed: an ONNX decoder through onnxruntime-genai, a GGUF through llama.cpp.

`generate(model, prompt_ids, max_new_tokens)` returns the new token ids and
two speeds:

* prefill: prompt tokens per second of the first step (the prompt in, the
  first new token out);
* decode: new tokens per second of the steps after it (one token in, the next
  out), the figure a user waits on while text appears.

Runtimes:

* a generation-ready ONNX folder (`optc --kv-cache -o out/model.onnx`: the
  model with its KV cache and `genai_config.json` beside it) through
  onnxruntime-genai;
* an ONNX model without a cache (`input_ids -> logits`) through onnxruntime,
  rerunning the whole sequence at every step (the loop a no-cache export
  forces; kept for comparison);
* a `.gguf` file through llama.cpp (llama-cpp-python).

Every runtime picks the token of highest logit among all but the
end-of-sequence token(s) (as transformers' `min_new_tokens` and
onnxruntime-genai's `min_length` do), so runs generate the same number of
tokens and their tokens can be compared one by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optc.errors import ModelLoadError, OptcError, UsageError, first_line
from optc.runtime.decoder import fill_decoder_inputs, has_cache, session_inputs


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one greedy generation produced and how fast."""

    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    runtime: str
    threads: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def generation_kind(path: str | Path) -> str:
    """`"genai"` (a folder with genai_config.json, or the ONNX inside it), `"onnx"` (no cache) or `"gguf"`."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "genai_config.json").is_file():
            return "genai"
        raise UsageError(f"{path}: a folder without genai_config.json; give an .onnx or .gguf file, or a folder optc --kv-cache wrote")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return "gguf"
    if suffix == ".onnx":
        return "genai" if (path.parent / "genai_config.json").is_file() and _decoder_file(path.parent) == path.name else "onnx"
    raise UsageError(f"{path}: unknown model suffix '{suffix or path.name}'; give an .onnx or .gguf file")


def _decoder_path(path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    return folder / (_decoder_file(folder) or "model.onnx")


def _decoder_file(folder: Path) -> str | None:
    try:
        return json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]["filename"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def generate(
    path: str | Path, prompt: Sequence[int], max_new_tokens: int, *, threads: int = 1, use_cache: bool = True,
) -> Generation:
    """Greedy generation of `max_new_tokens` after `prompt` (token ids); see the module docstring.

    `use_cache=False` runs an ONNX decoder's whole sequence at every step with an empty cache, which
    computes what the no-cache export computes (the loop generation without a cache costs).
    """
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if not prompt:
        raise UsageError("the prompt has no tokens")
    if threads < 1:
        raise UsageError(f"--threads {threads}: must be at least 1")
    kind = generation_kind(path)
    if kind == "genai" and not use_cache:
        kind, path = "onnx", _decoder_path(Path(path))
    steps = {"genai": _genai_steps, "onnx": _onnx_loop_steps, "gguf": _llama_steps}[kind]
    runtime, stepper = steps(Path(path), list(prompt), max_new_tokens, threads)
    tokens: list[int] = []
    times: list[float] = []
    with contextlib.closing(stepper):
        start = time.perf_counter()
        for token in stepper:
            now = time.perf_counter()
            times.append(now - start)
            start = now
            tokens.append(int(token))
            if len(tokens) == max_new_tokens:
                break
    return Generation(tokens, len(prompt), times[0], sum(times[1:]), runtime, threads)


# --------------------------------------------------------------------------- runtimes: each yields the new tokens


def _genai_steps(path: Path, prompt: list[int], new: int, threads: int) -> tuple[str, Iterator[int]]:
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise OptcError("generating from an ONNX folder needs onnxruntime-genai: pip install 'optc[genai]'") from exc
    folder = path if path.is_dir() else path.parent
    try:
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        model = og.Model(config)
    except Exception as exc:  # noqa: BLE001 - onnxruntime-genai raises its own types
        raise ModelLoadError(f"{folder}: onnxruntime-genai cannot load it ({first_line(exc)})") from exc
    params = og.GeneratorParams(model)
    total = len(prompt) + new
    params.set_search_options(max_length=total, min_length=total, do_sample=False, top_k=1)

    def steps() -> Iterator[int]:
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    return f"onnxruntime-genai {og.__version__}", steps()


def _onnx_loop_steps(path: Path, prompt: list[int], new: int, threads: int) -> tuple[str, Iterator[int]]:
    import onnxruntime as ort

    from optc.runtime.ort import open_session

    try:
        session = open_session(path, threads=threads)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: onnxruntime cannot load it ({first_line(exc)})") from exc
    inputs = session_inputs(session)
    names = [name for name, _, _ in inputs]
    if names != ["input_ids"] and not has_cache(names):
        raise OptcError(f"{path}: a model without genai_config.json must take input_ids alone (inputs: {', '.join(names)})")

    eos = _eos_tokens(path)

    def steps() -> Iterator[int]:
        ids = list(prompt)
        while True:  # the whole sequence again at every step, from an empty cache
            feed = fill_decoder_inputs(inputs, {"input_ids": np.asarray([ids], dtype=np.int64)})
            (logits,) = session.run(["logits"], feed)
            token = _greedy(logits[0, -1], eos)
            ids.append(token)
            yield token

    return f"onnxruntime {ort.__version__} (no cache: the whole sequence each step)", steps()


def _llama_steps(path: Path, prompt: list[int], new: int, threads: int) -> tuple[str, Iterator[int]]:
    from optc.evaluate import import_llama

    llama_cpp = import_llama("generating from")
    context = len(prompt) + new
    try:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=context, n_batch=max(len(prompt), 1), n_ubatch=max(len(prompt), 1),
            n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False,
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: llama.cpp cannot load it ({first_line(exc)})") from exc

    vocab = int(llm.n_vocab())

    def last_logits() -> np.ndarray:  # the logits of the last token llama.cpp evaluated
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def steps() -> Iterator[int]:
        try:
            llm.reset()
            llm.eval(prompt)
            eos = [int(llm.token_eos())]
            while True:
                token = _greedy(last_logits(), eos)
                yield token
                llm.eval([token])
        finally:
            llm.close()

    return f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", steps()


def _greedy(logits: np.ndarray, eos: list[int]) -> int:
    """The token of highest logit, the end-of-sequence tokens left out."""
    logits = np.array(logits, dtype=np.float32)
    logits[[t for t in eos if 0 <= t < len(logits)]] = -np.inf
    return int(logits.argmax())


def _eos_tokens(path: Path) -> list[int]:
    """End-of-sequence ids of an ONNX decoder: its genai_config.json, else the Hugging Face config it carries."""
    from optc.ir import load_model, model_metadata
    from optc.ir.annotations import HF_CONFIG

    eos = None
    if (path.parent / "genai_config.json").is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            eos = json.loads((path.parent / "genai_config.json").read_text(encoding="utf-8"))["model"]["eos_token_id"]
    if eos is None:
        eos = (model_metadata(load_model(path), HF_CONFIG) or {}).get("eos_token_id")
    if eos is None:
        return []
    return [int(t) for t in eos] if isinstance(eos, list) else [int(eos)]



def load_generation_tokenizer(path: str | Path, tokenizer: str | None = None) -> Any:
    """The tokenizer for a generation: `tokenizer` (as optc-eval's --tokenizer), the folder's own files, or the GGUF's."""
    from optc.evaluate import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    path = Path(path)
    kind = generation_kind(path)
    if kind == "genai":
        folder = path if path.is_dir() else path.parent
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            return load_tokenizer(folder)
        raise OptcError(f"{folder}: has no tokenizer files; pass --tokenizer SRC")
    return load_tokenizer(path)


__all__ = ["Generation", "generate", "generation_kind", "load_generation_tokenizer"]
