"""Polynomial arithmetic over the ring F7[X]/(X^5) (the paper's Fig. 8): the ring, the expressions, the data.

A polynomial is the tuple of its 5 coefficients c0..c4 (c_i of X^i) in 0..6; products and compositions drop
every power of X at or above 5. Composition p @ q is p(q(X)) evaluated in the ring on the degree-<5
representatives (Horner's rule). It is associative when the innermost polynomial has no constant term; with a
constant term, X^5 no longer vanishes under substitution, so (p@q)@r and p@(q@r) can differ: the expression
defines the value, innermost operations first.

Text format (byte-level tokens): a literal is its 5 coefficient digits c0c1c2c3c4 ("31040" is 3 + X + 4X^3);
negation is "-e"; addition, multiplication and composition are "(a+b)", "(a*b)", "(a@b)". A problem is
"EXPR=" followed by the answer's 5 digits, e.g. "(31040*-20001)=12345".
"""

from __future__ import annotations

import json
import random
from pathlib import Path

P = 7  # coefficients mod 7
D = 5  # powers X^0..X^4 kept
OPS = ("neg", "add", "mul", "compose")
_SYMBOL = {"add": "+", "mul": "*", "compose": "@"}

Poly = tuple


def add(a: Poly, b: Poly) -> Poly:
    return tuple((x + y) % P for x, y in zip(a, b))


def neg(a: Poly) -> Poly:
    return tuple(-x % P for x in a)


def mul(a: Poly, b: Poly) -> Poly:
    c = [0] * D
    for i, x in enumerate(a):
        if x:
            for j in range(D - i):  # i + j >= D is truncated
                c[i + j] += x * b[j]
    return tuple(v % P for v in c)


def constant(c: int) -> Poly:
    return (c % P,) + (0,) * (D - 1)


def compose(a: Poly, b: Poly) -> Poly:
    """a(b(X)) in the ring: Horner's rule, a_4 b^4 + ... + a_0 with every product truncated."""
    r = constant(0)
    for coef in reversed(a):
        r = add(mul(r, b), constant(coef))
    return r


APPLY = {"add": add, "mul": mul, "compose": compose}


def random_poly(rng: random.Random) -> Poly:
    return tuple(rng.randrange(P) for _ in range(D))


def random_expr(rng: random.Random, m: int):
    """A random expression tree with exactly m operations, operators and operand coefficients uniform; the
    operations of a binary node are split between its sides uniformly. Trees are ('lit', poly),
    ('neg', e) or (op, left, right)."""
    if m == 0:
        return ("lit", random_poly(rng))
    op = rng.choice(OPS)
    if op == "neg":
        return ("neg", random_expr(rng, m - 1))
    k = rng.randrange(m)
    return (op, random_expr(rng, k), random_expr(rng, m - 1 - k))


def evaluate(e) -> Poly:
    if e[0] == "lit":
        return e[1]
    if e[0] == "neg":
        return neg(evaluate(e[1]))
    return APPLY[e[0]](evaluate(e[1]), evaluate(e[2]))


def fmt_poly(p: Poly) -> str:
    return "".join(str(c) for c in p)


def fmt_expr(e) -> str:
    if e[0] == "lit":
        return fmt_poly(e[1])
    if e[0] == "neg":
        return "-" + fmt_expr(e[1])
    return f"({fmt_expr(e[1])}{_SYMBOL[e[0]]}{fmt_expr(e[2])})"


def problem(rng: random.Random, m: int) -> tuple[str, str]:
    """(prompt "EXPR=", answer digits) of a random m-operation expression."""
    e = random_expr(rng, m)
    return fmt_expr(e) + "=", fmt_poly(evaluate(e))


def make_datasets(seed: int, train_size: int, test_per_m: int, train_ms=range(1, 6), test_ms=range(1, 11)):
    """(training documents, test records). Test sets first, fixed by the seed, distinct within each m;
    training problems (m drawn uniformly from train_ms) whose expression is in a test set are redrawn, so the
    two are disjoint by expression string."""
    rng = random.Random(f"polynomial-test-{seed}")
    tests, seen = [], set()
    for m in test_ms:
        taken, tries = 0, 0
        while taken < test_per_m:
            tries += 1
            if tries > 100 * test_per_m:
                raise ValueError(f"cannot draw {test_per_m} distinct test expressions with m={m}")
            prompt, answer = problem(rng, m)
            if prompt not in seen:
                seen.add(prompt)
                tests.append({"prompt": prompt, "answer": answer, "m": m})
                taken += 1
    rng = random.Random(f"polynomial-train-{seed}")
    train_ms = list(train_ms)
    docs = []
    while len(docs) < train_size:
        prompt, answer = problem(rng, rng.choice(train_ms))
        if prompt not in seen:
            docs.append(prompt + answer)
    return docs, tests


def digit_accuracy_by_m(completions: Path) -> dict[str, float]:
    """Share of the answer's D coefficient digits the greedy completion gets right, by m (mtp-eval
    --completions): partial credit where exact match is still 0. Chance is 1/7."""
    right: dict[str, list[int]] = {}
    for line in completions.read_text().splitlines():
        r = json.loads(line)
        got = r["completion"].strip()
        hits = sum(a == b for a, b in zip(got, r["answer"]))
        right.setdefault(r["groups"]["m"], []).append(hits)
    return {m: sum(h) / (D * len(h)) for m, h in right.items()}
