"""Cleaning what other libraries say before optc shows its one line: hub addresses and log records.

optc reads models only from local files, so a library's advice to look at the
Hugging Face Hub (`... listed on 'https://huggingface.co/models'`, `Checkout
'https://huggingface.co/...' for available files`) does not apply: sentences
that point at the Hub are dropped, and a Hub address that is the whole point
of the only sentence becomes the words "the Hugging Face Hub".
"""

from __future__ import annotations

import logging
import re

#: A Hub address, quoted or not, with what follows it up to whitespace or the closing quote.
_HUB_URL = re.compile(r"""(['"`]?)https?://(?:www\.)?(?:huggingface\.co|hf\.co)\b[^\s'"`]*\1""")
_PLACEHOLDER = "\x00hub\x00"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def without_hub_urls(text: str) -> str:
    """`text` without Hugging Face Hub addresses (see the module docstring)."""
    if not _HUB_URL.search(text):
        return text
    marked = _HUB_URL.sub(_PLACEHOLDER, text)
    lines = []
    for line in marked.splitlines():
        sentences = _SENTENCE_END.split(line)
        kept = [s for s in sentences if _PLACEHOLDER not in s]
        if not kept and line.strip():
            kept = sentences[:1]  # the address is the only news: keep the sentence, in words
        if kept:
            lines.append(" ".join(kept))
    cleaned = "\n".join(lines).replace(_PLACEHOLDER, "the Hugging Face Hub")
    return cleaned.strip() or "a Hugging Face Hub lookup failed (optc reads local files only)"


#: Libraries whose log records (warnings about a model, say) would reach stderr through Python's last-resort
#: handler: optc reports what is wrong itself, in one line.
QUIET_LOGGERS = ("onnx_ir", "onnxscript", "onnx")


def quiet_library_logs() -> None:
    """Keep the log records of `QUIET_LOGGERS` off stderr (a `NullHandler` each; handlers added by whoever
    embeds optc still see them)."""
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
            logger.addHandler(logging.NullHandler())


__all__ = ["QUIET_LOGGERS", "quiet_library_logs", "without_hub_urls"]
