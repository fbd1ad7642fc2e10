"""The textual pipeline: parsing and canonical printing.

Grammar (MLIR's, flat by default like LLVM's):

    pipeline ::= element (',' element)*
    element  ::= name options? ('(' pipeline ')')?      a pass, a named pipeline, or a container
               | 'require<' analysis '>' | 'invalidate<' (analysis | 'all') '>'
    options  ::= '{' (key '=' value)* '}'               whitespace-separated; values may be
                                                        "quoted" and may hold commas

`print_pipeline(parse_pipeline(text)) == text` for canonical text: options in
declared order, defaults omitted, no spaces around commas. Named pipelines
expand in place, to their target's own text where they have one (`w3a16` for a
GGUF output). Errors name the 1-based column.
"""

from __future__ import annotations

from optc.errors import PipelineSyntaxError, UsageError
from optc.passes.infra.analysis_passes import InvalidateAnalysis, RequireAnalysis
from optc.passes.infra.pass_base import Pass
from optc.passes.infra.pass_manager import PassManager

#: Characters that end a name or an option key (besides whitespace and unprintable characters).
_DELIMITERS = set(",{}()<>='\"\\")
#: How deeply containers may nest: deeper text is refused before Python's recursion limit is near.
MAX_NESTING = 64
#: Named pipelines being expanded right now (to report one that includes itself).
_expanding: list[str] = []


class _Parser:
    def __init__(self, text: str, target: str | None = None) -> None:
        self.text = text
        self.target = target
        self.pos = 0
        self.depth = 0

    def error(self, message: str, pos: int | None = None) -> PipelineSyntaxError:
        return PipelineSyntaxError(message, self.text, (self.pos if pos is None else pos) + 1)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_space(self) -> None:
        while self.peek().isspace():
            self.pos += 1

    def expect(self, char: str) -> None:
        self.skip_space()
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "end of pipeline"
            raise self.error(f"expected '{char}', found {found}")
        self.pos += 1

    def word(self, what: str) -> str:
        """A name or key: every printable character up to a delimiter, so that an unknown name is named whole
        (`pässé`, not `p`); the registry or the options then refuse names they do not know."""
        self.skip_space()
        start = self.pos
        while self.peek() and _is_word_char(self.peek()):
            self.pos += 1
        if start == self.pos:
            found = repr(self.peek()) if self.peek() else "end of pipeline"
            raise self.error(f"expected {what}, found {found}")
        return self.text[start:self.pos]

    def pipeline(self, closing: str = "") -> list[Pass]:
        passes: list[Pass] = []
        self.skip_space()
        if self.peek() == closing or (not closing and not self.peek()):
            return passes
        while True:
            passes.extend(self.element())
            self.skip_space()
            if self.peek() == ",":
                self.pos += 1
                continue
            if self.peek() == closing or (not closing and not self.peek()):
                return passes
            found = repr(self.peek()) if self.peek() else "end of pipeline"
            expected = f"',' or '{closing}'" if closing else "',' or end of pipeline"
            raise self.error(f"expected {expected}, found {found}")

    def element(self) -> list[Pass]:
        from optc.passes.infra import registry

        self.skip_space()
        start = self.pos
        name = self.word("a pass name")
        if self.peek() == "<":
            return [self.analysis_pseudo_pass(name, start)]
        options: list[tuple[str, str]] = []
        has_options = self.peek_after_space() == "{"
        if has_options:
            options = self.options()
        children: list[Pass] | None = None
        if self.peek_after_space() == "(":
            if self.depth >= MAX_NESTING:
                raise self.error(f"passes nest more than {MAX_NESTING} levels deep")
            self.expect("(")
            self.depth += 1
            children = self.pipeline(closing=")")
            self.depth -= 1
            self.expect(")")
        named = registry.get_pipeline(name)
        if named is not None:
            if has_options or children is not None:
                raise self.error(f"named pipeline '{name}' takes no options or nested passes", start)
            if name in _expanding:
                raise UsageError(f"named pipeline '{name}' expands to itself ({' -> '.join([*_expanding, name])})")
            _expanding.append(name)
            try:
                return list(parse_pipeline(named.text_for(self.target), self.target).passes)
            finally:
                _expanding.pop()
        try:
            cls = registry.get_pass(name)
        except UsageError as exc:
            raise UsageError(f"{exc} (column {start + 1})") from None
        is_container = getattr(cls, "container", False)
        if children is not None and not is_container:
            raise self.error(f"pass '{name}' does not take nested passes", start)
        if children is None and is_container:
            raise self.error(f"pass '{name}' needs nested passes: {name}(pass,...)", start)
        instance = cls.from_text_options(options)
        if is_container:
            instance.passes = children  # type: ignore[attr-defined]
        return [instance]

    def peek_after_space(self) -> str:
        self.skip_space()
        return self.peek()

    def analysis_pseudo_pass(self, kind: str, start: int) -> Pass:
        from optc.passes.infra import registry

        if kind not in ("require", "invalidate"):
            raise self.error(f"'<...>' follows only 'require' or 'invalidate', not '{kind}'", start)
        self.expect("<")
        name = self.word("an analysis name")
        self.expect(">")
        if kind == "invalidate" and name == "all":
            return InvalidateAnalysis(None)
        analysis = registry.get_analysis(name)
        return RequireAnalysis(analysis) if kind == "require" else InvalidateAnalysis(analysis)

    def options(self) -> list[tuple[str, str]]:
        self.expect("{")
        items: list[tuple[str, str]] = []
        while True:
            self.skip_space()
            if self.peek() == "}":
                self.pos += 1
                return items
            if not self.peek():
                raise self.error("unterminated options: expected '}'")
            key = self.word("an option name")
            if self.peek() != "=":
                found = repr(self.peek()) if self.peek() else "end of pipeline"
                raise self.error(f"expected '=' after option '{key}', found {found}")
            self.pos += 1
            items.append((key, self.value()))

    def value(self) -> str:
        quote = self.peek()
        if quote in ("'", '"'):
            start = self.pos
            self.pos += 1
            chars: list[str] = []
            while True:
                char = self.peek()
                if not char:
                    raise self.error("unterminated quoted value", start)
                self.pos += 1
                if char == "\\" and self.peek():
                    chars.append(self.peek())
                    self.pos += 1
                elif char == quote:
                    return "".join(chars)
                else:
                    chars.append(char)
        start = self.pos
        while self.peek() and not self.peek().isspace() and self.peek() not in "{}()'\"":
            self.pos += 1
        if start == self.pos:
            found = repr(self.peek()) if self.peek() else "end of pipeline"
            raise self.error(f"expected a value, found {found}")
        return self.text[start:self.pos]


def _is_word_char(char: str) -> bool:
    return char.isprintable() and not char.isspace() and char not in _DELIMITERS


def parse_pipeline(text: str, target: str | None = None) -> PassManager:
    """Parse pipeline text into a `PassManager`; raises `UsageError`/`PipelineSyntaxError`.

    `target` (a backend name) picks the target's own text of a named pipeline that has one.
    """
    parser = _Parser(text, target)
    passes = parser.pipeline()
    return PassManager(passes)


def pipeline_warnings(pipeline: PassManager) -> list[str]:
    """Warnings about the order of a pipeline's passes (each pass's `order_warning`), e.g. distill after quantize."""
    flat: list[Pass] = []

    def walk(manager: PassManager) -> None:
        for pass_ in manager.passes:
            if isinstance(pass_, PassManager):
                walk(pass_)
            else:
                flat.append(pass_)

    walk(pipeline)
    return [message for i, pass_ in enumerate(flat) if (message := pass_.order_warning(flat[:i]))]


def print_pipeline(pipeline: PassManager | Pass) -> str:
    """Canonical text of a pipeline or a single pass."""
    return pipeline.pipeline_text()
