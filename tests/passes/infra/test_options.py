"""Typed pass options: parsing from text, canonical printing, clear usage errors."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import pytest

from optc.errors import UsageError
from optc.passes import NoOptions, Pass, PassResult, option
from optc.passes.infra.options import (
    build_options,
    describe_options,
    describe_type,
    format_options,
    format_value,
    parse_value,
)


@dataclasses.dataclass
class QuantOptions:
    bits: Literal[2, 3, 4, 8] = option(4, help="weight bits")
    scheme: Literal["sym", "asym"] = option("sym", help="zero point or not")
    group: int = option(128, help="columns per scale; -1 for per-channel")
    alpha: float = option(0.5, help="migration strength")
    act_order: bool = option(False, help="quantize columns by decreasing activation")
    exclude: list[str] = option(["lm_head"], help="names to skip")
    layers: list[int] = option([], help="layer indices")
    note: str = option("", help="free text")
    limit: int | None = option(None, help="optional bound")

    def validate(self) -> None:
        if self.group == 0:
            raise ValueError("option 'group' must not be 0")


class Quant(Pass):
    """Test pass with every option type."""

    name = "t-quant"
    Options = QuantOptions

    def run(self, model, am):
        return PassResult(model, modified=False)


def build(*items: tuple[str, str]) -> QuantOptions:
    return build_options(QuantOptions, "t-quant", list(items))


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
     ("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False)],
)
def test_parse_bool(text, value):
    assert parse_value(bool, text) is value


@pytest.mark.parametrize("text", ["", "2", "maybe", "t"])
def test_parse_bool_rejects(text):
    with pytest.raises(ValueError):
        parse_value(bool, text)


def test_parse_int_and_float():
    assert parse_value(int, "42") == 42
    assert parse_value(int, "-7") == -7
    assert parse_value(int, "0x10") == 16
    assert parse_value(float, "0.25") == 0.25
    assert parse_value(float, "1e-3") == 0.001
    assert parse_value(float, "3") == 3.0
    assert math.isinf(parse_value(float, "inf"))
    for tp, text in ((int, "1.5"), (int, "abc"), (float, "nan"), (float, "x")):
        with pytest.raises(ValueError):
            parse_value(tp, text)


def test_parse_literal():
    assert parse_value(Literal[2, 3, 4, 8], "8") == 8
    assert parse_value(Literal["sym", "asym"], "ASYM") == "asym"
    with pytest.raises(ValueError):
        parse_value(Literal[2, 3, 4, 8], "5")


def test_parse_lists():
    assert parse_value(list[int], "1,2, 3") == [1, 2, 3]
    assert parse_value(list[str], "a,b") == ["a", "b"]
    assert parse_value(list[str], "") == []
    assert parse_value(list[Literal["int8", "fp8"]], "fp8,int8") == ["fp8", "int8"]
    with pytest.raises(ValueError):
        parse_value(list[int], "1,x")


def test_parse_optional():
    assert parse_value(int | None, "none") is None
    assert parse_value(int | None, "3") == 3


# --- printing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"), (False, "false"), (3, "3"), (-1, "-1"), (0.5, "0.5"), (1e-08, "1e-08"),
        (None, "none"), ("int8", "int8"), ("a/b:c", "a/b:c"), ("", '""'), ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'), ("back\\slash", '"back\\\\slash"'), ([1, 2], "1,2"), ([], '""'),
        (["a b", "c"], '"a b,c"'),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


@pytest.mark.parametrize(
    ("tp", "value"),
    [(str, "two words"), (str, ""), (str, 'q"uote'), (float, 1e-20), (float, -0.1), (int, -5),
     (list[str], ["a b", "c d"]), (list[str], ["x"]), (list[float], [0.5, 1e+30]), (list[int], [])],
)
def test_format_then_parse(tp, value):
    text = format_value(value)
    unquoted = text[1:-1].replace('\\"', '"').replace("\\\\", "\\") if text.startswith('"') else text
    assert parse_value(tp, unquoted) == value


def test_format_options_declared_order_and_defaults_omitted():
    assert format_options(QuantOptions()) == ""
    assert format_options(NoOptions()) == ""
    options = QuantOptions(note="hi there", bits=8, exclude=["lm_head"], act_order=True, layers=[0, 1])
    assert format_options(options) == '{bits=8 act-order=true layers=0,1 note="hi there"}'
    assert format_options(QuantOptions(exclude=[])) == '{exclude=""}'
    assert format_options(QuantOptions(limit=3, alpha=1.0)) == "{alpha=1.0 limit=3}"


# --- building from text ----------------------------------------------------------------------


def test_build_options_from_text():
    options = build(("bits", "8"), ("act-order", "true"), ("exclude", "a,b"), ("alpha", "0.1"), ("limit", "none"))
    assert options == QuantOptions(bits=8, act_order=True, exclude=["a", "b"], alpha=0.1, limit=None)
    assert build() == QuantOptions()


def test_unknown_option_suggests_closest():
    with pytest.raises(UsageError) as info:
        build(("act_ordr", "true"))
    message = str(info.value)
    assert "pass 't-quant' has no option 'act_ordr'" in message
    assert "did you mean 'act-order'?" in message
    assert "its options: bits, scheme, group, alpha, act-order, exclude, layers, note, limit" in message


def test_unknown_option_without_close_match():
    with pytest.raises(UsageError) as info:
        build(("zzzzzz", "1"))
    assert "did you mean" not in str(info.value)


def test_option_of_pass_without_options():
    with pytest.raises(UsageError, match="pass 't-none' takes no options, got 'bits'"):
        build_options(NoOptions, "t-none", [("bits", "4")])


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("group", "big", "option 'group' expects an int, got 'big'"),
        ("alpha", "half", "option 'alpha' expects a float, got 'half'"),
        ("act-order", "sometimes", "option 'act-order' expects a bool (true/false), got 'sometimes'"),
        ("bits", "5", "option 'bits' expects one of 2, 3, 4, 8, got '5'"),
        ("scheme", "int4", "option 'scheme' expects one of sym, asym, got 'int4'"),
        ("layers", "1,two", "option 'layers' expects a comma-separated list of int, got '1,two'"),
        ("limit", "lots", "option 'limit' expects an int (or none), got 'lots'"),
    ],
)
def test_ill_typed_option(key, text, expected):
    with pytest.raises(UsageError) as info:
        build((key, text))
    assert str(info.value) == f"pass 't-quant': {expected}"
    assert info.value.exit_code == 2


def test_option_given_twice():
    with pytest.raises(UsageError, match="option 'bits' is given twice"):
        build(("bits", "4"), ("bits", "8"))


def test_validate_hook():
    with pytest.raises(UsageError, match="pass 't-quant': option 'group' must not be 0"):
        build(("group", "0"))


def test_snake_case_key_accepted():
    assert build(("act_order", "yes")).act_order is True


def test_describe():
    assert describe_type(int) == "an int"
    assert describe_type(list[Literal["a", "b"]]) == "a comma-separated list of one of a, b"
    rows = {row[0]: row for row in describe_options(QuantOptions)}
    assert rows["bits"] == ("bits", "one of 2, 3, 4, 8", "4", "weight bits")
    assert rows["exclude"][2] == "lm_head"
    assert rows["limit"][1:3] == ("an int (or none)", "none")
    assert list(rows) == ["bits", "scheme", "group", "alpha", "act-order", "exclude", "layers", "note", "limit"]


# --- on passes -------------------------------------------------------------------------------


def test_pass_construction_and_text():
    assert Quant().options == QuantOptions()
    assert Quant(bits=2).options.bits == 2
    assert Quant(QuantOptions(bits=8), group=64).options == QuantOptions(bits=8, group=64)
    assert Quant(bits=8, scheme="asym").pipeline_text() == "t-quant{bits=8 scheme=asym}"
    assert repr(Quant(bits=8)) == "<pass t-quant{bits=8}>"
    assert Quant.from_text_options([("bits", "8")]) == Quant(bits=8)
    assert Quant(bits=8) != Quant(bits=4)
    assert hash(Quant(bits=8)) == hash(Quant(bits=8))
    assert Quant.summary() == "Test pass with every option type."


def test_list_default_is_not_shared():
    a, b = QuantOptions(), QuantOptions()
    a.exclude.append("x")
    assert b.exclude == ["lm_head"]
