"""`optc-eval`: perplexity, size on disk and latency of an ONNX or GGUF causal LM.

    optc-eval MODEL [--text FILE] [--ctx 256] [--max-tokens N] [--tokenizer SRC] [--threads N]
    optc-eval MODEL --generate --prompt TEXT [--max-new-tokens 64] [--threads N]

`--generate` runs greedy generation instead (`optc.generate`): a folder written
with `optc --kv-cache` (or the .onnx inside it) through onnxruntime-genai, an
.onnx without a cache by rerunning the sequence, a .gguf through llama.cpp; it
prints the generated text and the prefill and decode tokens per second.

The text is tokenized once, with one Hugging Face tokenizer, and the same
token ids go to every backend (llama.cpp's own tokenizer differs from the HF
one on runs of whitespace, so letting each runtime tokenize would compare
different token streams). No special tokens (BOS) are added.

Windows: the first `--max-tokens` tokens of the text (all of them by default)
are cut into consecutive, non-overlapping windows of `--ctx` tokens; a tail
shorter than a window is dropped. Each window is scored on its own, from an
empty context: tokens 2..ctx are predicted from the prefix inside the window,
so a window contributes `ctx - 1` predicted tokens and

    ppl = exp(sum of -log p(token | prefix) / predicted tokens)

Runtimes: `.onnx` through onnxruntime (CPU; the model needs an `input_ids`
input and a `logits` output; `attention_mask`, `position_ids` and
`token_type_ids` inputs are fed ones, positions and zeros), `.gguf` through
llama.cpp (llama-cpp-python, the optional extra `optc[llama]`).

Tokenizer (`--tokenizer SRC`): a Hugging Face model directory, a `.gguf` file
(its tokenizer as transformers reads it) or an ONNX file made by optc (the
tokenizer stored in its metadata). Default: the ONNX model's own stored
tokenizer, or for a `.gguf` model the tokenizer of that same file.

Text: `--text FILE`, or by default the `eval` split of Python's own
`pydoc_data.topics` (see `optc.runtime.text`), which calibration never sees.
`--text builtin:NAME` names a built-in text instead: `builtin:topics` (that
eval split), `builtin:code` (standard-library Python source, a different
source and kind than the calibration text) or `builtin:docstrings` (the
development text for choosing defaults).

It prints the size on disk (model plus external data), the median wall time
of one window's forward pass (after one untimed warm-up run), and ends with
the line `ppl=<value>`. Exit codes as for `optc`: 0 success, 2 usage error,
1 any other failure, each failure one line on stderr (`--debug` adds the
traceback).

The reusable entry point is `evaluate()`, which the driver uses for
before/after tables.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optc import __version__
from optc.errors import ModelLoadError, OptcError, UsageError, first_line
from optc.runtime.decoder import fill_decoder_inputs, is_past, session_inputs

PROG = "optc-eval"
SUFFIXES = (".onnx", ".gguf")
TOKENIZER_HINT = (
    "pass --tokenizer SRC (a Hugging Face model directory, a .gguf file, or an ONNX file made by optc)"
)
LLAMA_HINT = "pip install 'optc[llama]'"
#: Inputs besides `input_ids` that a causal LM may take, and how they are fed.
_AUX_INPUTS = ("attention_mask", "position_ids", "token_type_ids")


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation measured."""

    ppl: float
    #: Predicted tokens: `windows * (ctx - 1)`.
    tokens: int
    windows: int
    #: Model file plus its external data (ONNX) or all split parts (GGUF).
    size_bytes: int
    #: Median wall time of one window's forward pass.
    median_latency_s: float
    ctx: int = 0
    #: Tokens in the whole text (before --max-tokens and window rounding).
    text_tokens: int = 0
    #: The runtime that ran it, e.g. `onnxruntime 1.23.0` or `llama.cpp (llama-cpp-python 0.3.36)`.
    runtime: str = ""
    threads: int = 0

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per predicted token (nats)."""
        return math.log(self.ppl) if self.ppl > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "ppl": self.ppl, "tokens": self.tokens, "windows": self.windows, "size_bytes": self.size_bytes,
            "median_latency_s": self.median_latency_s, "ctx": self.ctx, "text_tokens": self.text_tokens,
            "runtime": self.runtime, "threads": self.threads,
        }


# --------------------------------------------------------------------------- model files


def model_kind(path: str | Path) -> str:
    """`"onnx"` or `"gguf"` from an existing model file; one clear error otherwise."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; {PROG} reads an .onnx or .gguf file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"{path}: unknown model suffix '{suffix or path.name}'; {PROG} reads .onnx (onnxruntime) or .gguf (llama.cpp)")
    return suffix[1:]


_SPLIT_GGUF = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)


def gguf_size_bytes(path: str | Path) -> int:
    """Bytes of a GGUF file, or of all parts of a split one (`name-00001-of-00003.gguf`)."""
    path = Path(path)
    match = _SPLIT_GGUF.match(path.name)
    if not match:
        return path.stat().st_size
    count = int(match["count"])
    parts = [path.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    return sum(p.stat().st_size for p in parts if p.exists())


def size_on_disk(path: str | Path) -> int:
    """Bytes on disk of a model: ONNX plus external data, or every part of a GGUF."""
    if model_kind(path) == "gguf":
        return gguf_size_bytes(path)
    from optc.ir import model_size_bytes

    return model_size_bytes(path)


# --------------------------------------------------------------------------- tokenizers


def _gguf_tokenizer(path: Path) -> Any:
    """The HF tokenizer transformers builds from a GGUF file's metadata (no weights are read)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers and gguf raise many types
        raise OptcError(f"{path}: transformers cannot read a tokenizer from this GGUF file ({first_line(exc)}); {TOKENIZER_HINT}") from exc


def _directory_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise OptcError(f"--tokenizer {path}: no Hugging Face tokenizer in this directory ({first_line(exc)})") from exc


def _onnx_tokenizer(path: Path, *, model: Any = None, role: str) -> Any:
    from optc.ir import load_model, model_metadata
    from optc.ir.annotations import TOKENIZER
    from optc.runtime.tokenizer import tokenizer_from_files

    model = load_model(path) if model is None else model
    entry = model_metadata(model, TOKENIZER)
    if not entry or not entry.get("files"):
        raise OptcError(f"{role}{path}: carries no tokenizer; {TOKENIZER_HINT}")
    try:
        return tokenizer_from_files(entry["files"])
    except Exception as exc:  # noqa: BLE001
        raise OptcError(f"{role}{path}: the stored tokenizer cannot be rebuilt ({first_line(exc)}); {TOKENIZER_HINT}") from exc


def load_tokenizer(src: str | Path) -> Any:
    """A Hugging Face tokenizer from a model directory, a `.gguf` file or an optc ONNX file."""
    path = Path(src)
    if not path.exists():
        raise OptcError(f"--tokenizer {src}: no such file or directory")
    if path.is_dir():
        return _directory_tokenizer(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return _gguf_tokenizer(path)
    if suffix == ".onnx":
        return _onnx_tokenizer(path, role="--tokenizer ")
    raise UsageError(
        f"--tokenizer {src}: unknown kind '{suffix or path.name}'; give a Hugging Face directory, a .gguf file or an .onnx file"
    )


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of `text` without special tokens, as int64 (the same ids go to every backend)."""
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    return np.asarray(encoded["input_ids"], dtype=np.int64).reshape(-1)


# --------------------------------------------------------------------------- scoring


def window_nll(logits: np.ndarray, ids: np.ndarray, *, chunk: int = 64) -> float:
    """Sum over t of -log softmax(logits[t])[ids[t + 1]], t = 0..len(ids)-2, in float64."""
    targets = np.asarray(ids, dtype=np.int64)[1:]
    total = 0.0
    for start in range(0, len(targets), chunk):
        x = np.asarray(logits[start:start + chunk][: len(targets) - start], dtype=np.float64)
        top = x.max(axis=-1)
        lse = top + np.log(np.exp(x - top[:, None]).sum(axis=-1))
        total += float((lse - x[np.arange(len(x)), targets[start:start + len(x)]]).sum())
    return total


def window_count(n_tokens: int, ctx: int, max_tokens: int | None = None) -> int:
    """Whole windows of `ctx` tokens in the first `max_tokens` (default: all) of `n_tokens`."""
    usable = n_tokens if max_tokens is None else min(n_tokens, max_tokens)
    return usable // ctx


#: A runner scores one window: token ids [ctx] in, logits [ctx, vocab] out.
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass
class _Backend:
    run: Runner
    vocab: int | None
    runtime: str
    close: Callable[[], None] = lambda: None


def onnx_backend(path: Path, model: Any, threads: int) -> _Backend:
    """The scoring backend of an ONNX model: an onnxruntime session on `threads` threads."""
    import onnxruntime as ort

    from optc.runtime.ort import open_session

    graph = model.graph
    inputs = [v.name for v in graph.inputs if v.name not in graph.initializers]
    vocab = None
    for value in graph.outputs:
        if value.name == "logits" and value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
            vocab = int(value.shape[-1])
    try:
        session = open_session(path, threads=threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise OptcError(f"{path}: onnxruntime cannot load it ({first_line(exc)})") from exc
    types = {i.name: i.type for i in session.get_inputs()}
    int_type = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}

    def dtype(name: str):
        if types.get(name) not in int_type:
            raise OptcError(f"{path}: input {name!r} is {types.get(name)}, expected an integer tensor")
        return int_type[types[name]]

    for name in inputs:
        if not is_past(name):
            dtype(name)
    # A KV-cache decoder is scored as a prefill with an empty cache.
    specs = session_inputs(session)

    def run(ids: np.ndarray) -> np.ndarray:
        seq = len(ids)
        feed = {"input_ids": ids[None, :].astype(dtype("input_ids"))}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones((1, seq), dtype=dtype("attention_mask"))
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(seq, dtype=dtype("position_ids"))[None, :]
        if "token_type_ids" in inputs:
            feed["token_type_ids"] = np.zeros((1, seq), dtype=dtype("token_type_ids"))
        feed = fill_decoder_inputs(specs, feed)
        try:
            (logits,) = session.run(["logits"], feed)
        except Exception as exc:  # noqa: BLE001
            raise OptcError(f"{path}: onnxruntime failed on a window of {seq} tokens ({first_line(exc)})") from exc
        if logits.ndim != 3 or logits.shape[:2] != (1, seq):
            raise OptcError(f"{path}: 'logits' has shape {list(logits.shape)}, expected [1, {seq}, vocab]")
        return logits[0]

    return _Backend(run, vocab, f"onnxruntime {ort.__version__}")


def _check_onnx_interface(path: Path, model: Any) -> None:
    graph = model.graph
    inputs = [v.name for v in graph.inputs if v.name not in graph.initializers]
    outputs = [v.name for v in graph.outputs]
    if "input_ids" not in inputs or "logits" not in outputs:
        raise OptcError(
            f"{path}: not a causal LM {PROG} can score: it needs an 'input_ids' input and a 'logits' output "
            f"(inputs: {', '.join(inputs) or 'none'}; outputs: {', '.join(outputs) or 'none'})"
        )
    extra = [name for name in inputs if name != "input_ids" and name not in _AUX_INPUTS and not is_past(name)]
    if extra:
        raise OptcError(
            f"{path}: {PROG} cannot feed the input(s) {', '.join(extra)} "
            f"(it feeds input_ids, {', '.join(_AUX_INPUTS)} and an empty KV cache)"
        )


def import_llama(doing: str = "evaluating") -> Any:
    """llama-cpp-python, its log lines silenced; without it, one line saying what `doing` a .gguf model needs."""
    from optc.backends.gguf import import_llama_cpp

    try:
        return import_llama_cpp()
    except ImportError as exc:
        raise OptcError(f"{doing} a .gguf model needs llama-cpp-python, which is not installed: {LLAMA_HINT}") from exc


def _gguf_backend(path: Path, ctx: int, threads: int) -> _Backend:
    llama_cpp = import_llama()
    try:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
            n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - llama-cpp-python raises ValueError/RuntimeError
        raise ModelLoadError(f"{path}: llama.cpp cannot load it ({first_line(exc)})") from exc

    def run(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        try:
            llm.eval(ids.tolist())
        except Exception as exc:  # noqa: BLE001
            raise OptcError(f"{path}: llama.cpp failed on a window of {len(ids)} tokens ({first_line(exc)})") from exc
        return llm.scores[: len(ids)]

    return _Backend(run, int(llm.n_vocab()), f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", llm.close)


def default_threads() -> int:
    """The CPUs this process may run on (the same count for every runtime, so latencies compare)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def evaluate(
    model_path: str | Path,
    text: str | None = None,
    ctx: int = 256,
    max_tokens: int | None = None,
    tokenizer: Any = None,
    *,
    threads: int | None = None,
) -> EvalResult:
    """Perplexity of an `.onnx` or `.gguf` causal LM on `text` (see the module docstring).

    `text=None` uses the built-in eval split. `tokenizer` is a loaded HF
    tokenizer, a source for `load_tokenizer` (directory, .gguf, .onnx), or
    None for the model's own. `threads` (default: every available CPU) is
    given to onnxruntime and llama.cpp alike. Raises `OptcError` with one line.
    """
    path = Path(model_path)
    if ctx < 2:
        raise UsageError(f"--ctx {ctx}: a window needs at least 2 tokens")
    if max_tokens is not None and max_tokens < ctx:
        raise UsageError(f"--max-tokens {max_tokens} is less than one window (--ctx {ctx})")
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise UsageError(f"--threads {threads}: must be at least 1")
    kind = model_kind(path)

    onnx_model = None
    if kind == "gguf":
        import_llama()  # fail before the (slow) tokenizer load
    else:
        from optc.ir import load_model

        onnx_model = load_model(path)
        _check_onnx_interface(path, onnx_model)

    if tokenizer is None:
        tokenizer = _gguf_tokenizer(path) if kind == "gguf" else _onnx_tokenizer(path, model=onnx_model, role="")
    elif isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(tokenizer)

    if text is None:
        from optc.runtime.text import builtin_text

        text = builtin_text("eval")
    ids = tokenize(tokenizer, text)
    text_tokens = len(ids)
    windows = window_count(text_tokens, ctx, max_tokens)
    if windows == 0:
        raise OptcError(f"the text has {text_tokens} tokens, fewer than one window of {ctx} (--ctx); give a longer --text or a smaller --ctx")

    ids = ids[: windows * ctx]
    backend = _gguf_backend(path, ctx, threads) if kind == "gguf" else onnx_backend(path, onnx_model, threads)
    del onnx_model
    try:
        if backend.vocab is not None and int(ids.max()) >= backend.vocab:
            raise OptcError(
                f"the tokenizer does not match {path.name}: token id {int(ids.max())} but the model has {backend.vocab} logits; {TOKENIZER_HINT}"
            )
        total, latencies = 0.0, []
        for index, window in enumerate(_windows(ids, ctx, windows)):
            if index == 0:
                backend.run(window)  # warm-up: first-run allocations are not latency
            start = time.perf_counter()
            logits = backend.run(window)
            latencies.append(time.perf_counter() - start)
            if logits.shape[-1] <= int(window.max()):
                raise OptcError(
                    f"the tokenizer does not match {path.name}: token id {int(window.max())} but the model has {logits.shape[-1]} logits; {TOKENIZER_HINT}"
                )
            total += window_nll(logits, window)
    finally:
        backend.close()
    tokens = windows * (ctx - 1)
    ppl = math.exp(total / tokens) if math.isfinite(total) else float("nan")
    return EvalResult(
        ppl=ppl, tokens=tokens, windows=windows, size_bytes=size_on_disk(path),
        median_latency_s=statistics.median(latencies), ctx=ctx, text_tokens=text_tokens,
        runtime=backend.runtime, threads=threads,
    )


def _windows(ids: np.ndarray, ctx: int, count: int) -> Iterator[np.ndarray]:
    for i in range(count):
        yield ids[i * ctx:(i + 1) * ctx]


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="Perplexity, size on disk and latency of an .onnx (onnxruntime) or .gguf (llama.cpp) causal LM.",
        epilog="Example: optc-eval smollm2.onnx --ctx 256 --max-tokens 4096   (last line: ppl=<value>)",
    )
    parser.add_argument("model", help="the model: .onnx or .gguf (with --generate also a folder optc --kv-cache wrote)")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text to score, or builtin:topics|code|docstrings "
                        "(default: the eval split of Python's pydoc_data.topics)")
    parser.add_argument("--ctx", type=int, default=256, metavar="N", help="tokens per window (default 256)")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="use only the first N tokens of the text (default: all)")
    parser.add_argument("--tokenizer", metavar="SRC", help="Hugging Face directory, .gguf file or optc .onnx file (default: the model's own)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for the runtime (default: every available CPU)")
    parser.add_argument("--generate", action="store_true", help="generate greedily from --prompt and report tokens per second")
    parser.add_argument("--prompt", metavar="TEXT", help="the prompt for --generate")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens --generate adds (default 64)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    parser.add_argument("--version", action="version", version=f"{PROG} (optc {__version__})")
    return parser


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB ({n:,} bytes)"


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # Nothing is fetched at run time: every tokenizer comes from a local file or folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if args.generate:
        return _run_generation(args)
    if args.prompt is not None:
        raise UsageError("--prompt needs --generate")
    if args.text is None:
        from optc.runtime.text import describe

        text, source = None, describe("eval")
    elif args.text.startswith("builtin:"):
        from optc.runtime.text import NAMED_TEXTS, named_text

        name = args.text.partition(":")[2]
        if name not in NAMED_TEXTS:
            raise UsageError(f"--text {args.text}: unknown built-in text; expected builtin:{'|'.join(NAMED_TEXTS)}")
        text, source = named_text(name), f"{args.text} ({NAMED_TEXTS[name]})"
    else:
        path = Path(args.text)
        if not path.is_file():
            raise OptcError(f"--text {args.text}: no such file")
        text, source = path.read_text(encoding="utf-8", errors="replace"), str(path)
    result = evaluate(args.model, text, args.ctx, args.max_tokens, args.tokenizer, threads=args.threads)
    print(f"{PROG}: {args.model}: {result.runtime}, {result.threads} thread(s)")
    print(f"{PROG}: text {source}: {result.text_tokens:,} tokens; {result.windows} window(s) of {result.ctx}, "
          f"{result.tokens:,} predicted tokens")
    print(f"{PROG}: size on disk {_mib(result.size_bytes)}")
    print(f"{PROG}: median latency {result.median_latency_s * 1e3:.1f} ms per window of {result.ctx} tokens")
    print(f"ppl={result.ppl:.4f}")
    return 0


def _run_generation(args: argparse.Namespace) -> int:
    from optc.generate import generate, load_generation_tokenizer

    if args.prompt is None:
        raise UsageError("--generate needs --prompt TEXT")
    threads = default_threads() if args.threads is None else args.threads
    tokenizer = load_generation_tokenizer(args.model, args.tokenizer)
    prompt = [int(t) for t in tokenizer(args.prompt)["input_ids"]]
    result = generate(args.model, prompt, args.max_new_tokens, threads=threads)
    print(f"{PROG}: {args.model}: {result.runtime}, {result.threads} thread(s)")
    print(f"{args.prompt}{tokenizer.decode(result.tokens, skip_special_tokens=True)}")
    print(f"{PROG}: prefill {result.prompt_tokens} tokens: {result.prefill_tokens_per_s:.1f} tokens/s")
    print(f"{PROG}: decode {len(result.tokens) - 1} tokens: {result.decode_tokens_per_s:.1f} tokens/s")
    return 0



def main(argv: list[str] | None = None) -> int:
    """Run `optc-eval`; every failure ends in one `optc-eval: error:` line (after a traceback with --debug)."""
    from optc.entry import run_command

    return run_command(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
