"""The FileCheck-style matcher of the golden tests (`filecheck.py`): every directive, passing and failing."""

from __future__ import annotations

import re

import pytest

from tests.golden.filecheck import (
    CheckFailure,
    CheckFormatError,
    check,
    looks_like_directive,
    parse_directive,
)

PREFIXES = ("CHECK", "STDERR")

TEXT = """\
<
   ir_version: 10
>
g (float[2,4] x) => (float[2,2] y)
   <int4[4,2] w_q4 = ..., float[2] w_scale =  {0.13,0.27}>
{
   [w_DequantizeLinear] w_dq = DequantizeLinear <axis: int = 1> (w_q4, w_scale)
   y = MatMul (x, w_dq)
}

# @node w_DequantizeLinear provenance="rtn"
"""


def directives(*lines: str) -> list:
    return [parse_directive(line, f"case.onnxtxt:{n}", PREFIXES) for n, line in enumerate(lines, start=1)]


def run(*lines: str, text: str = TEXT) -> None:
    check(directives(*lines), text, "<output>")


def fails(*lines: str, text: str = TEXT) -> str:
    with pytest.raises(CheckFailure) as info:
        run(*lines, text=text)
    return str(info.value)


# ---------------------------------------------------------------------------------------- CHECK


def test_check_matches_substrings_in_order():
    run("# CHECK: int4[4,2] w_q4", "# CHECK: DequantizeLinear <axis: int = 1>", "# CHECK: MatMul")


def test_check_can_match_later_on_the_same_line():
    run("# CHECK: w_dq = ", "# CHECK: (w_q4, w_scale)")


def test_check_out_of_order_fails_and_names_the_directive_and_region():
    message = fails("# CHECK: MatMul", "# CHECK: = DequantizeLinear")
    assert message.startswith("case.onnxtxt:2: error: CHECK: expected string not found in <output>")
    assert "# CHECK: = DequantizeLinear" in message
    # The searched region starts on the line of the MatMul match and shows it.
    assert "scanning from line 8" in message
    assert "8 |    y = MatMul (x, w_dq)" in message
    assert "7 |" not in message


def test_not_found_suggests_a_close_line():
    message = fails("# CHECK: y = MatMul (x, w_dequantized)")
    assert "possible intended match here: 'y = MatMul (x, w_dq)'" in message


def test_whitespace_runs_match_any_horizontal_whitespace():
    run("# CHECK: float[2] w_scale = {0.13,0.27}")  # the printer writes two spaces after '='
    run("# CHECK:     y   =   MatMul")  # leading and extra whitespace in the pattern
    fails("# CHECK: w_scale={0.13")  # no whitespace in the pattern: none in the match
    fails("# CHECK: ir_version: 10 >")  # whitespace does not span a line end


def test_regex_blocks():
    run("# CHECK: float[{{[0-9]+}}] w_scale", "# CHECK: <axis: int = {{0|1}}>")
    run("# CHECK: {{^}}g (", "# CHECK: y){{$}}")  # ^ and $ anchor at line starts and ends
    fails("# CHECK: {{^}}y = MatMul")
    fails("# CHECK: <axis: int = {{[02-9]}}>")


def test_regex_special_characters_outside_blocks_are_literal():
    run("# CHECK: [w_DequantizeLinear]", "# CHECK: (w_q4, w_scale)")
    fails("# CHECK: w_q. = ...")


def test_variables_capture_and_match_literally():
    run(
        "# CHECK: [[DQ:w_[a-z]+]] = DequantizeLinear",
        "# CHECK: MatMul (x, [[DQ]])",
    )
    message = fails(
        "# CHECK: [[SCALE:w_[a-z]+]] = ",
        "# CHECK: MatMul (x, [[SCALE]]_other)",
    )
    assert "note: with variable SCALE = 'w_scale'" in message


def test_variable_used_on_its_own_line_is_a_back_reference():
    run("# CHECK: [[N:[0-9]]],[[N]]]", text="float[4,4] a\n")
    fails("# CHECK: [[N:[0-9]]],[[N]]]", text="float[4,2] a\n")


def test_undefined_variable_is_a_format_error():
    with pytest.raises(CheckFormatError, match=r"case.onnxtxt:1: .* undefined variable 'NOPE'"):
        run("# CHECK: [[NOPE]]")


# ---------------------------------------------------------------------------------------- NEXT, SAME, EMPTY


def test_next_must_be_on_the_following_line():
    run("# CHECK: DequantizeLinear", "# CHECK-NEXT: MatMul", "# CHECK-NEXT: }")
    message = fails("# CHECK: g (float", "# CHECK-NEXT: DequantizeLinear")
    assert "error: CHECK-NEXT: the match is not on the line after the previous match" in message
    assert "case.onnxtxt:2:" in message


def test_next_on_the_same_line_fails():
    message = fails("# CHECK: w_dq =", "# CHECK-NEXT: DequantizeLinear")
    assert "is on the same line as the previous match" in message


def test_next_at_the_top_means_the_first_line():
    run("# CHECK-NEXT: <")
    fails("# CHECK-NEXT: ir_version")


def test_same_line():
    run("# CHECK: DequantizeLinear", "# CHECK-SAME: <axis: int = 1>", "# CHECK-SAME: w_scale)")
    message = fails("# CHECK: DequantizeLinear", "# CHECK-SAME: MatMul")
    assert "CHECK-SAME: the match is not on the same line as the previous match" in message


def test_empty():
    run("# CHECK: {{^}}}", "# CHECK-EMPTY:", "# CHECK-NEXT: # @node")
    message = fails("# CHECK: MatMul", "# CHECK-EMPTY:")
    assert "CHECK-EMPTY" in message


# ---------------------------------------------------------------------------------------- NOT


def test_not_between_matches():
    run("# CHECK: DequantizeLinear", "# CHECK-NOT: float[4,2]", "# CHECK: MatMul")
    message = fails("# CHECK: g (", "# CHECK-NOT: w_scale", "# CHECK: MatMul")
    assert message.startswith("case.onnxtxt:2: error: CHECK-NOT: excluded string found in <output>")
    assert "<output>:5: note: found here" in message
    assert "the region searched (lines 4-8)" in message


def test_not_at_the_start_and_end():
    run("# CHECK-NOT: QuantizeLinear (", "# CHECK: DequantizeLinear")
    run("# CHECK: MatMul", "# CHECK-NOT: = DequantizeLinear")
    fails("# CHECK: g (", "# CHECK-NOT: MatMul")
    fails("# CHECK-NOT: @node")


def test_not_alone_covers_everything():
    run("# CHECK-NOT: Transpose")
    fails("# CHECK-NOT: provenance")


# ---------------------------------------------------------------------------------------- COUNT


def test_count():
    text = "a = Relu (x)\nb = Relu (a)\nc = Neg (b)\nd = Relu (c)\n"
    run("# CHECK-COUNT-2: Relu", "# CHECK: Neg", text=text)
    run("# CHECK-COUNT-3: Relu", text=text)
    message = fails("# CHECK-COUNT-4: Relu", text=text)
    assert "error: CHECK-COUNT-4: expected string not found" in message


# ---------------------------------------------------------------------------------------- LABEL


LABELLED = """\
== block one
x = Relu (a)
== block two
y = Neg (b)
z = Relu (y)
"""


def test_labels_split_the_text_into_blocks():
    run("# CHECK-LABEL: block one", "# CHECK: Relu", "# CHECK-LABEL: block two", "# CHECK: Neg", text=LABELLED)
    # Neg is only in block two: a check for it under block one fails even though it comes later.
    message = fails("# CHECK-LABEL: block one", "# CHECK: Neg", "# CHECK-LABEL: block two", text=LABELLED)
    assert "expected string not found" in message
    assert "4 |" not in message  # the region searched stops before the next label


def test_not_stays_inside_its_block_and_next_follows_the_label():
    run("# CHECK-LABEL: block one", "# CHECK-NOT: Neg", "# CHECK-LABEL: block two", "# CHECK-NEXT: Neg", text=LABELLED)
    fails("# CHECK-LABEL: block two", "# CHECK-NOT: Relu", text=LABELLED)


def test_missing_label_fails_first():
    message = fails("# CHECK-LABEL: block three", "# CHECK: Relu", text=LABELLED)
    assert message.startswith("case.onnxtxt:1: error: CHECK-LABEL: expected string not found")


def test_labels_match_in_order():
    fails("# CHECK-LABEL: block two", "# CHECK-LABEL: block one", text=LABELLED)


# ---------------------------------------------------------------------------------------- the lines


def test_other_prefixes():
    directive = parse_directive("# STDERR-NOT: error", "f:1", PREFIXES)
    assert (directive.prefix, directive.kind, directive.pattern) == ("STDERR", "NOT", "error")
    assert parse_directive("# CHECK-COUNT-3: x", "f:1", PREFIXES).count == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("# CHECK-NXT: a", "unknown directive CHECK-NXT"),
        ("# CHECK-NOT a", "malformed directive"),
        ("# CHECK-COUNT: a", "only COUNT takes a number"),
        ("# CHECK-NOT-2: a", "only COUNT takes a number"),
        ("# CHECK-COUNT-0: a", "at least 1"),
        ("# CHECK:", "needs a pattern"),
        ("# CHECK-EMPTY: a", "takes no pattern"),
        ("# CHECK: {{[a-}}", "bad regex"),
        ("# CHECK: {{a", "unterminated '{{'"),
        ("# CHECK: [[a", "unterminated '[['"),
        ("# CHECK: [[1X:a]]", "bad variable name"),
        ("# CHECK-NOT: [[X:a]]", "may not define a variable"),
        ("# CHECK: [[X:a]] [[X:b]]", "defined twice"),
        ("# CHECK-LABEL: [[X:a]]", "may not define or use variables"),
    ],
)
def test_malformed_directives_name_their_line(line, message):
    with pytest.raises(CheckFormatError, match=r"^f:7: .*" + re.escape(message)):
        parse_directive(line, "f:7", PREFIXES)


def test_what_looks_like_a_directive():
    assert looks_like_directive("# CHECK: x", PREFIXES)
    assert looks_like_directive("# CHECK-NXT x", PREFIXES)
    assert looks_like_directive("#CHECK: x", PREFIXES)
    assert not looks_like_directive("# Checks that x", PREFIXES)
    assert not looks_like_directive("# CHECKSUM of x", PREFIXES)
    assert not looks_like_directive("# @node %y quant={}", PREFIXES)


def test_no_directives_pass_anything():
    check([], "", "<output>")


def test_long_regions_are_cut():
    text = "".join(f"line {i}\n" for i in range(200))
    message = fails("# CHECK: absent", text=text)
    assert "more line(s)" in message
    assert "line 150" not in message
