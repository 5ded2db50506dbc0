"""The ring F7[X]/(X^5) of the polynomial recipe, checked against numpy's full polynomial arithmetic truncated
afterwards, and its identities on random polynomials; the generated data's train/test disjointness."""

import random

import numpy as np
import pytest

from mtplm.recipes import polynomial as P


def rand(rng, constant_term=True):
    p = P.random_poly(rng)
    return p if constant_term else (0,) + p[1:]


def reference_truncate(full) -> tuple:
    """Full integer coefficients (lowest power first) reduced mod 7 and cut to X^0..X^4."""
    full = [int(c) for c in full] + [0] * P.D
    return tuple(c % P.P for c in full[: P.D])


def reference_compose(a, b) -> tuple:
    """a(b(X)) with untruncated integer polynomials, truncated only at the end."""
    acc = np.zeros(1, dtype=object)
    for i, c in enumerate(a):
        term = np.array([c], dtype=object)
        for _ in range(i):
            term = np.convolve(term, np.array(b, dtype=object))
        acc = np.pad(acc, (0, max(0, len(term) - len(acc))))
        acc[: len(term)] += term
    return reference_truncate(acc)


@pytest.mark.parametrize("seed", range(3))
def test_operations_match_untruncated_reference(seed):
    rng = random.Random(seed)
    for _ in range(200):
        a, b = rand(rng), rand(rng)
        assert P.mul(a, b) == reference_truncate(np.convolve(np.array(a, dtype=object), np.array(b, dtype=object)))
        assert P.add(a, b) == reference_truncate(np.array(a) + np.array(b))
        assert P.neg(a) == reference_truncate(-np.array(a))
        assert P.compose(a, b) == reference_compose(a, b)


@pytest.mark.parametrize("d", [2, 3])
def test_a_smaller_ring_matches_the_untruncated_reference(d):
    """The CPU analogue F7[X]/(X^d): the same operations with d coefficients, against numpy's full arithmetic."""
    ring, rng = P.Ring(d=d), random.Random(d)
    cut = lambda full: tuple(int(c) % 7 for c in (list(full) + [0] * d)[:d])  # noqa: E731
    for _ in range(200):
        a, b = ring.random_poly(rng), ring.random_poly(rng)
        assert len(a) == d and ring.mul(a, b) == cut(np.convolve(np.array(a, dtype=object), np.array(b, dtype=object)))
        assert ring.add(a, b) == cut(np.array(a) + np.array(b)) and ring.neg(a) == cut(-np.array(a))
        full = np.zeros(d * d, dtype=object)  # a(b) untruncated has degree (d-1)^2
        for i, c in enumerate(a):
            term = _power(b, i) * c
            full[: len(term)] += term
        assert ring.compose(a, b) == cut(full)
    prompt, answer, op = P.problem(rng, 1, ring)
    assert len(answer) == d and op in P.OPS and str(ring) == f"F7[X]/(X^{d})"


def _power(b, i):
    out = np.array([1], dtype=object)
    for _ in range(i):
        out = np.convolve(out, np.array(b, dtype=object))
    return out


def test_truncation_rule():
    x = lambda k: tuple(int(i == k) for i in range(P.D))
    assert P.mul(x(4), x(1)) == (0,) * 5 and P.mul(x(2), x(3)) == (0,) * 5
    assert P.mul(x(2), x(2)) == x(4)
    assert P.mul((0, 0, 0, 3, 0), (0, 0, 5, 0, 0)) == (0,) * 5  # 15 X^5 vanishes
    assert P.mul((6, 0, 0, 0, 0), (6, 0, 0, 0, 0)) == (1, 0, 0, 0, 0)  # 36 = 1 mod 7
    # (1 + X)^5 = 1 + 5X + 10X^2 + 10X^3 + 5X^4 + X^5 -> 1 5 3 3 5
    assert P.compose((0, 0, 0, 0, 0), (1, 1, 0, 0, 0)) == (0,) * 5
    p5 = P.mul(P.mul(P.mul(P.mul((1, 1, 0, 0, 0), (1, 1, 0, 0, 0)), (1, 1, 0, 0, 0)), (1, 1, 0, 0, 0)), (1, 1, 0, 0, 0))
    assert p5 == (1, 5, 3, 3, 5)


def test_ring_identities_on_random_polynomials():
    rng = random.Random(7)
    one, zero, x = (1, 0, 0, 0, 0), (0,) * 5, (0, 1, 0, 0, 0)
    for _ in range(300):
        a, b, c = rand(rng), rand(rng), rand(rng)
        assert P.mul(a, P.add(b, c)) == P.add(P.mul(a, b), P.mul(a, c))  # distributivity
        assert P.mul(P.mul(a, b), c) == P.mul(a, P.mul(b, c))
        assert P.mul(a, b) == P.mul(b, a) and P.mul(a, one) == a and P.add(a, P.neg(a)) == zero
        assert P.compose(P.add(a, b), c) == P.add(P.compose(a, c), P.compose(b, c))  # right distributivity
        assert P.compose(a, x) == a and P.compose(x, a) == a
        # Associativity of composition, and composition of a product, hold when the innermost polynomial has
        # no constant term (else the truncated X^5 terms come back under substitution).
        r = rand(rng, constant_term=False)
        assert P.compose(P.compose(a, b), r) == P.compose(a, P.compose(b, r))
        assert P.compose(P.mul(a, b), r) == P.mul(P.compose(a, r), P.compose(b, r))


def test_composition_not_associative_with_a_constant_term():
    """Why the docstring says the expression (innermost first) defines the value: X^5 only vanishes under
    substitution of a polynomial without constant term."""
    a, b, r = (0, 0, 0, 0, 1), (0, 1, 0, 0, 0), (1, 1, 0, 0, 0)  # X^4, X, 1 + X
    a_b = P.compose(a, P.mul(b, (0, 1, 0, 0, 0)))  # (X^2)^4 = X^8 -> 0
    assert a_b == (0,) * 5
    assert P.compose(a_b, r) != P.compose(a, P.compose(P.mul(b, (0, 1, 0, 0, 0)), r))


def test_expressions_have_m_operations_and_evaluate_to_their_answer():
    rng = random.Random(3)
    for m in range(0, 11):
        for _ in range(20):
            e = P.random_expr(rng, m)
            text = P.fmt_expr(e)
            ops = text.count("+") + text.count("*") + text.count("@") + text.count("-")
            assert ops == m, text
            assert len(P.fmt_poly(P.evaluate(e))) == 5


def test_datasets_are_disjoint_and_test_sets_fixed(monkeypatch):
    # Operands from 7 constants only: training draws would repeat test expressions unless they are filtered.
    monkeypatch.setattr(P, "random_poly", lambda rng: P.constant(rng.randrange(P.P)))
    docs, tests = P.make_datasets(0, 3000, 30, test_ms=range(1, 4))
    test_prompts = {t["prompt"] for t in tests}
    assert len(test_prompts) == len(tests) == 90
    assert not {d[: d.index("=") + 1] for d in docs} & test_prompts
    assert [t["m"] for t in tests] == [1] * 30 + [2] * 30 + [3] * 30
    # m = 1 records name their operator (mtp-eval groups by it), so accuracy by operator is reported
    assert all(t["op"] == {"-": "neg", "+": "add", "*": "mul", "@": "compose"}[
        next(c for c in t["prompt"] if c in "-+*@")] for t in tests[:30]) and "op" not in tests[30]
    assert P.make_datasets(0, 10, 30, test_ms=range(1, 4))[1] == tests
    for d in docs[:200]:
        prompt, answer = d.split("=")
        assert answer == P.fmt_poly(P.evaluate(parse(prompt)))


def parse(text):
    """A reference parser of the format, independent of the generator's trees."""
    pos = 0

    def expr():
        nonlocal pos
        if text[pos] == "-":
            pos += 1
            return ("neg", expr())
        if text[pos] == "(":
            pos += 1
            left = expr()
            op = {"+": "add", "*": "mul", "@": "compose"}[text[pos]]
            pos += 1
            right = expr()
            assert text[pos] == ")"
            pos += 1
            return (op, left, right)
        lit = tuple(int(c) for c in text[pos:pos + 5])
        pos += 5
        return ("lit", lit)

    e = expr()
    assert pos == len(text)
    return e


def test_digit_accuracy_counts_matching_positions_by_m(tmp_path):
    import json

    f = tmp_path / "completions.jsonl"
    recs = [("12345", " 12345\n", "1"), ("12345", "12000", "1"), ("00000", "0", "2"), ("65432", "", "2")]
    f.write_text("".join(json.dumps({"answer": a, "completion": c, "groups": {"m": m}}) + "\n" for a, c, m in recs))
    assert P.digit_accuracy_by_m(f) == {"1": (5 + 2) / 10, "2": 1 / 10}
