"""`optc.ir.patterns.rewrite`: match → check → rewrite to a fixpoint, with a reason for every failed match."""

from __future__ import annotations

from optc.ir import make_node, parse_text
from optc.ir.patterns.rewrite import Rule, apply_rules

_MODEL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2] x) => (float[2] y) {
  a = Neg(x)
  b = Neg(a)
  c = Abs(b)
  y = Neg(c)
}
"""


def _negations(graph):
    """A rule that folds Neg(Neg(v)) into v, and refuses (with a reason) a Neg of an Abs."""

    def match(node):
        if node.op_type != "Neg":
            return None
        inner = node.inputs[0].producer()
        return (node, inner) if inner is not None and inner.op_type in ("Neg", "Abs") else None

    def check(found):
        return "a Neg of an Abs" if found[1].op_type == "Abs" else None

    def rewrite(found):
        outer, inner = found
        source = inner.inputs[0]
        for use in list(outer.outputs[0].uses()):
            use.node.replace_input_with(use.idx, source)
        graph.remove(outer, safe=True)
        if not inner.outputs[0].uses():
            graph.remove(inner, safe=True)
        return True

    return Rule("double-negation", match, rewrite, check)


def test_rules_rewrite_what_they_match_and_give_a_reason_for_what_they_cannot():
    model = parse_text(_MODEL)
    graph = model.graph
    result = apply_rules(graph, [_negations(graph)])
    assert [n.op_type for n in graph] == ["Abs", "Neg"]
    assert result.applied == {"double-negation": 1} and result.total == 1
    assert result.rounds == 2  # the second round rewrote nothing
    assert result.reasons() == ["a Neg of an Abs"] and result.misses[0].node.outputs[0].name == "y"


def test_a_rewrite_that_makes_a_new_match_is_applied_in_the_next_round():
    model = parse_text(_MODEL)
    graph = model.graph
    inserted = []

    def match(node):
        return node if node.op_type == "Abs" and not inserted else None

    def add_negations(node):  # Abs(b) → Abs(Neg(Neg(b))): two new Negs for the other rule
        first = make_node("Neg", [node.inputs[0]])
        second = make_node("Neg", [first.outputs[0]])
        graph.insert_before(node, [first, second])
        node.replace_input_with(0, second.outputs[0])
        inserted.append(node)
        return True

    result = apply_rules(graph, [Rule("grow", match, add_negations), _negations(graph)])
    assert result.applied == {"grow": 1, "double-negation": 2}
    assert [n.op_type for n in graph] == ["Abs", "Neg"]


def test_one_round_without_fixpoint_and_a_guard_against_rules_that_never_settle():
    model = parse_text(_MODEL)
    graph = model.graph
    assert apply_rules(graph, [_negations(graph)], fixpoint=False).rounds == 1
    forever = Rule("forever", lambda node: node if node.op_type == "Abs" else None, lambda node: True)
    assert apply_rules(graph, [forever], max_rounds=3).rounds == 3


def test_a_preparing_rule_lets_the_next_rule_take_the_same_node():
    model = parse_text(_MODEL)
    graph = model.graph
    seen: list[str] = []
    mark = Rule("mark", lambda node: node if node.op_type == "Abs" else None,
                lambda node: seen.append("mark") or True, exclusive=False)
    take = Rule("take", lambda node: node if node.op_type == "Abs" else None, lambda node: seen.append("take") or True)
    result = apply_rules(graph, [mark, take], fixpoint=False)
    assert seen == ["mark", "take"] and result.applied == {"mark": 1, "take": 1}
