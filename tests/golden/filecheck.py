"""A small FileCheck: match `CHECK`-style directives against a text, as LLVM's FileCheck does.

Directives (for a prefix `CHECK`; golden files also use `STDERR`):

* `CHECK: pat`       the next match of `pat` after the previous match;
* `CHECK-NEXT: pat`  a match on the line right after the previous match's line;
* `CHECK-SAME: pat`  a match on the same line as the previous match, after it;
* `CHECK-EMPTY:`     the line after the previous match's line is empty;
* `CHECK-NOT: pat`   no match between the previous match and the next one
  (or the end of the block when no positive directive follows);
* `CHECK-COUNT-n: pat`  `n` consecutive matches, as `n` `CHECK:` lines would;
* `CHECK-LABEL: pat` matched first, in order, over the whole text; the text is
  then split at the labels and the other directives match within their block.

A pattern is a substring; horizontal whitespace in it matches any run of
spaces or tabs, leading and trailing whitespace are ignored. `{{regex}}`
embeds a Python regular expression (`^` and `$` anchor at line starts and ends), `[[NAME:regex]]` captures what the regex
matched into the variable NAME, and `[[NAME]]` matches a captured value
literally (a capture earlier on the same line is matched by back-reference).
Variables live for one `check` call. Patterns never match across a line end
unless a regex block says so.

A failure raises `CheckFailure` with FileCheck's message: where the directive
is (`file:line`), the directive, and the region of the text that was searched.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable

#: Directive kinds besides the plain one, as written after `<PREFIX>-`.
KINDS = ("NEXT", "SAME", "EMPTY", "NOT", "LABEL", "COUNT")
_VAR_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SHOWN_LINES = 40  # most lines of the searched region a failure message shows


class CheckFormatError(ValueError):
    """A directive that is malformed (unknown kind, bad regex, undefined variable...); names its line."""


class CheckFailure(AssertionError):
    """The text does not satisfy a directive; the message reads like FileCheck's."""


@dataclasses.dataclass(frozen=True)
class Directive:
    prefix: str  # "CHECK", "STDERR", ...
    kind: str  # "" (plain), "NEXT", "SAME", "EMPTY", "NOT", "LABEL" or "COUNT"
    pattern: str  # as written, stripped
    where: str  # "file:line" of the directive, for messages
    count: int = 1  # for COUNT

    @property
    def spelling(self) -> str:
        """The directive as written, e.g. `CHECK-COUNT-2: foo`."""
        suffix = f"-COUNT-{self.count}" if self.kind == "COUNT" else f"-{self.kind}" if self.kind else ""
        return f"{self.prefix}{suffix}: {self.pattern}".rstrip()


def directive_regex(prefixes: Iterable[str]) -> re.Pattern[str]:
    """Matches a `# <PREFIX>[-KIND]:` comment line; group `prefix`, `kind`, `count` and `pattern`."""
    alternatives = "|".join(re.escape(p) for p in prefixes)
    return re.compile(
        rf"^#\s*(?P<prefix>{alternatives})(?:-(?P<kind>[A-Z]+)(?:-(?P<count>\d+))?)?:(?P<pattern>.*)$"
    )


def looks_like_directive(line: str, prefixes: Iterable[str]) -> bool:
    """A comment that starts with a prefix word (`# CHECK...`): a directive, or a misspelled one."""
    return re.match(rf"^#\s*(?:{'|'.join(re.escape(p) for p in prefixes)})\b", line) is not None


def parse_directive(line: str, where: str, prefixes: Iterable[str]) -> Directive:
    """One directive from a `# CHECK...: pattern` line; `CheckFormatError` when it is malformed."""
    prefixes = tuple(prefixes)
    match = directive_regex(prefixes).match(line)
    if match is None:
        raise CheckFormatError(f"{where}: malformed directive {line.strip()!r} (write `# <PREFIX>[-KIND]: pattern`)")
    prefix, kind, count = match["prefix"], match["kind"] or "", match["count"]
    pattern = match["pattern"].strip()
    if kind not in ("", *KINDS):
        raise CheckFormatError(f"{where}: unknown directive {prefix}-{kind} (known: {', '.join(KINDS)})")
    if (count is not None) != (kind == "COUNT"):
        raise CheckFormatError(f"{where}: only COUNT takes a number, and it needs one: {prefix}-COUNT-<n>")
    number = int(count) if count is not None else 1
    if kind == "COUNT" and number < 1:
        raise CheckFormatError(f"{where}: {prefix}-COUNT needs a count of at least 1")
    if kind == "EMPTY":
        if pattern:
            raise CheckFormatError(f"{where}: {prefix}-EMPTY takes no pattern")
    elif not pattern:
        raise CheckFormatError(f"{where}: {prefix}{'-' + kind if kind else ''} needs a pattern")
    directive = Directive(prefix, kind, pattern, where, number)
    if kind == "LABEL" and "[[" in pattern:
        raise CheckFormatError(f"{where}: {prefix}-LABEL may not define or use variables")
    _compile(directive, {}, check_uses=False)  # reports bad regexes and bad `[[...]]` now
    return directive


# ---------------------------------------------------------------------------------------- patterns

_TOKEN = re.compile(r"\{\{|\[\[")


def _compile(directive: Directive, variables: dict[str, str], *, check_uses: bool = True) -> re.Pattern[str]:
    """The pattern as a regex; `[[X]]` uses become the captured value (or a back-reference)."""
    text, where = directive.pattern, directive.where
    parts: list[str] = []
    defined_here: set[str] = set()
    pos = 0
    while True:
        token = _TOKEN.search(text, pos)
        literal = text[pos:token.start()] if token else text[pos:]
        parts.append(_literal(literal))
        if token is None:
            break
        if token.group() == "{{":
            end = text.find("}}", token.end())
            if end < 0:
                raise CheckFormatError(f"{where}: unterminated '{{{{' in {directive.spelling!r}")
            body = text[token.end():end]
            _check_regex(body, where)
            parts.append(f"(?:{body})")
            pos = end + 2
            continue
        end = _variable_end(text, token.end())
        if end < 0:
            raise CheckFormatError(f"{where}: unterminated '[[' in {directive.spelling!r}")
        body = text[token.end():end]
        pos = end + 2
        name, colon, regex = body.partition(":")
        if not re.fullmatch(_VAR_NAME, name):
            raise CheckFormatError(f"{where}: bad variable name {name!r} in {directive.spelling!r}")
        if colon:
            if directive.kind == "NOT":
                raise CheckFormatError(f"{where}: {directive.prefix}-NOT may not define a variable ({name})")
            if name in defined_here:
                raise CheckFormatError(f"{where}: variable {name!r} is defined twice on one line")
            _check_regex(regex, where)
            defined_here.add(name)
            parts.append(f"(?P<{name}>{regex})")
        elif name in defined_here:
            parts.append(f"(?P={name})")
        elif name in variables:
            parts.append(re.escape(variables[name]))
        elif check_uses:
            raise CheckFormatError(f"{where}: {directive.spelling!r} uses undefined variable {name!r}")
        else:
            parts.append("")
    return re.compile("".join(parts), re.MULTILINE)


def _variable_end(text: str, start: int) -> int:
    """Offset of the `]]` that closes a `[[` opened before `start`, skipping brackets of the regex; -1 if none."""
    depth, i = 0, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if depth == 0 and text.startswith("]]", i):
            return i
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(0, depth - 1)
        i += 1
    return -1


def _literal(text: str) -> str:
    return r"[ \t]+".join(re.escape(word) for word in re.split(r"[ \t]+", text))


def _check_regex(regex: str, where: str) -> None:
    try:
        re.compile(regex, re.MULTILINE)
    except re.error as exc:
        raise CheckFormatError(f"{where}: bad regex {{{{{regex}}}}}: {exc}") from None


# ---------------------------------------------------------------------------------------- matching


@dataclasses.dataclass
class _Text:
    """The text being checked, with line arithmetic for messages."""

    name: str  # e.g. "<output>"
    body: str

    def line_of(self, pos: int) -> int:
        """0-based line number of offset `pos`."""
        return self.body.count("\n", 0, pos)

    def line_start(self, pos: int) -> int:
        return self.body.rfind("\n", 0, pos) + 1

    def line_end(self, pos: int) -> int:
        end = self.body.find("\n", pos)
        return len(self.body) if end < 0 else end


def check(directives: list[Directive], text: str, name: str = "<output>") -> None:
    """Match every directive against `text` (called `name` in messages); raise `CheckFailure` on the first failure."""
    if not directives:
        return
    source = _Text(name, text)
    variables: dict[str, str] = {}
    # Labels first, in order over the whole text; each starts a block that runs to the next label.
    bounds: list[tuple[int, int]] = []
    cursor = 0
    for label in (d for d in directives if d.kind == "LABEL"):
        found = _compile(label, variables).search(text, cursor)
        if found is None:
            _fail_not_found(label, source, cursor, len(text))
        bounds.append((found.start(), found.end()))
        cursor = found.end()
    groups: list[list[Directive]] = [[]]
    for directive in directives:
        if directive.kind == "LABEL":
            groups.append([])
        else:
            groups[-1].append(directive)
    ends = [start for start, _ in bounds] + [len(text)]
    for index, group in enumerate(groups):
        # A label is its block's first match: NEXT, SAME and EMPTY after it are relative to it.
        previous = bounds[index - 1] if index else None
        _check_block(group, source, previous[1] if previous else 0, ends[index], previous, variables)


def _check_block(
    directives: list[Directive],
    source: _Text,
    start: int,
    end: int,
    previous: tuple[int, int] | None,
    variables: dict[str, str],
) -> None:
    """Directives of one block, in order, between offsets `start` and `end`."""
    text = source.body
    cursor = start
    last = previous  # (start, end) of the previous positive match, None at the top of the text
    pending_not: list[Directive] = []
    for directive in directives:
        if directive.kind == "NOT":
            pending_not.append(directive)
            continue
        if directive.kind == "EMPTY":
            found = _empty_line_after(source, last, end)
            if found is None:
                _fail_position(directive, source, last, cursor, end, "is not on the line after the previous match")
            _check_nots(pending_not, source, cursor, found[0], variables)
            pending_not = []
            last, cursor = found, found[1]
            continue
        for _ in range(directive.count):
            regex = _compile(directive, variables)
            found = regex.search(text, cursor, end)
            if found is None:
                _fail_not_found(directive, source, cursor, end, variables)
            if directive.kind == "NEXT":
                _require_next_line(directive, source, last, cursor, end, found)
            elif directive.kind == "SAME":
                _require_same_line(directive, source, last, cursor, end, found)
            _check_nots(pending_not, source, cursor, found.start(), variables)
            pending_not = []
            variables.update({k: v for k, v in found.groupdict().items() if v is not None and k in _defined(directive)})
            last, cursor = (found.start(), found.end()), found.end()
    _check_nots(pending_not, source, cursor, end, variables)


def _defined(directive: Directive) -> set[str]:
    return set(re.findall(rf"\[\[({_VAR_NAME}):", directive.pattern))


def _empty_line_after(source: _Text, last: tuple[int, int] | None, end: int) -> tuple[int, int] | None:
    """The (start, end) of the empty line right after the previous match's line (the first line at the top)."""
    line = 0 if last is None else source.line_end(last[1]) + 1
    if line >= len(source.body) or line > end or source.line_end(line) != line:
        return None
    return line, line


def _require_next_line(directive: Directive, source: _Text, last, cursor: int, end: int, found: re.Match) -> None:
    expected = 0 if last is None else source.line_of(last[1]) + 1
    actual = source.line_of(found.start())
    if actual == expected:
        return
    why = "is on the same line as the previous match" if actual < expected else "is not on the line after the previous match"
    _fail_position(directive, source, last, cursor, end, why, found)


def _require_same_line(directive: Directive, source: _Text, last, cursor: int, end: int, found: re.Match) -> None:
    expected = 0 if last is None else source.line_of(last[1])
    if source.line_of(found.start()) != expected:
        _fail_position(directive, source, last, cursor, end, "is not on the same line as the previous match", found)


def _check_nots(nots: list[Directive], source: _Text, start: int, end: int, variables: dict[str, str]) -> None:
    for directive in nots:
        found = _compile(directive, variables).search(source.body, start, end)
        if found is not None:
            raise CheckFailure(
                f"{directive.where}: error: {directive.prefix}-NOT: excluded string found in {source.name}\n"
                f"{_quote(directive)}\n"
                f"{source.name}:{source.line_of(found.start()) + 1}: note: found here\n"
                f"{_region(source, source.line_start(found.start()), source.line_end(found.start()), mark=found.start())}"
                f"{source.name}: note: the region searched (lines {_line_span(source, start, end)}):\n"
                f"{_region(source, start, end)}"
            )


# ---------------------------------------------------------------------------------------- messages


def _quote(directive: Directive) -> str:
    return f"  # {directive.spelling}"


def _line_span(source: _Text, start: int, end: int) -> str:
    first = source.line_of(start) + 1
    last = source.line_of(max(start, end - 1)) + 1 if end > start else first
    return f"{first}-{last}" if last != first else f"{first}"


def _region(source: _Text, start: int, end: int, mark: int | None = None) -> str:
    """Lines of the text from `start` to `end`, numbered, at most `_SHOWN_LINES` of them."""
    text = source.body
    first = source.line_of(start)
    chunk = text[source.line_start(start):max(end, source.line_start(start))]
    lines = chunk.split("\n")
    if lines and lines[-1] == "" and len(lines) > 1:
        lines.pop()
    if not chunk:
        return "  (empty)\n"
    shown = lines[:_SHOWN_LINES]
    out = [f"  {first + i + 1:>4} | {line}" for i, line in enumerate(shown)]
    if mark is not None:
        column = mark - source.line_start(mark)
        out.insert(source.line_of(mark) - first + 1, "       | " + " " * column + "^")
    if len(lines) > len(shown):
        out.append(f"       | ... {len(lines) - len(shown)} more line(s)")
    return "\n".join(out) + "\n"


def _fail_not_found(directive: Directive, source: _Text, start: int, end: int, variables: dict[str, str] | None = None) -> None:
    text = source.body
    lines = text[source.line_start(start):end].split("\n")
    literal = re.sub(r"\{\{.*?\}\}|\[\[.*?\]\]", "", directive.pattern).strip()
    hint = ""
    close = difflib.get_close_matches(literal, [line.strip() for line in lines], n=1, cutoff=0.5) if literal else []
    if close:
        number = source.line_of(start) + 1 + next(i for i, line in enumerate(lines) if line.strip() == close[0])
        hint = f"{source.name}:{number}: note: possible intended match here: {close[0]!r}\n"
    used = {name: variables[name] for name in re.findall(rf"\[\[({_VAR_NAME})\]\]", directive.pattern)
            if variables and name in variables}
    with_vars = "".join(f"  note: with variable {name} = {value!r}\n" for name, value in used.items())
    kind = f"{directive.prefix}-{directive.kind}" if directive.kind else directive.prefix
    if directive.kind == "COUNT":
        kind = f"{directive.prefix}-COUNT-{directive.count}"
    raise CheckFailure(
        f"{directive.where}: error: {kind}: expected string not found in {source.name}\n"
        f"{_quote(directive)}\n{with_vars}"
        f"{source.name}: note: scanning from line {source.line_of(start) + 1} "
        f"(the region searched, lines {_line_span(source, start, end)}):\n"
        f"{_region(source, start, end)}{hint}"
    )


def _fail_position(directive, source: _Text, last, cursor: int, end: int, why: str, found: re.Match | None = None) -> None:
    kind = f"{directive.prefix}-{directive.kind}"
    where = f"{source.name}:{source.line_of(found.start()) + 1}: note: the match\n" if found is not None else ""
    previous = (
        f"{source.name}:{source.line_of(last[1]) + 1}: note: the previous match ends here\n" if last is not None
        else f"{source.name}: note: no previous match (top of the text)\n"
    )
    raise CheckFailure(
        f"{directive.where}: error: {kind}: the match {why}\n{_quote(directive)}\n{previous}{where}"
        f"{source.name}: note: the region searched (lines {_line_span(source, source.line_start(cursor), end)}):\n"
        f"{_region(source, cursor, end, mark=found.start() if found is not None else None)}"
    )
