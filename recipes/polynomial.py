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
from dataclasses import dataclass
from pathlib import Path

P = 7  # coefficients mod 7
D = 5  # powers X^0..X^4 kept (the paper's ring); the CPU preset's analogue keeps fewer (Ring(d=3))
OPS = ("neg", "add", "mul", "compose")
_SYMBOL = {"add": "+", "mul": "*", "compose": "@"}

Poly = tuple


@dataclass(frozen=True)
class Ring:
    """F_p[X]/(X^d): polynomials as tuples of d coefficients in 0..p-1, lowest power first."""

    p: int = P
    d: int = D

    def add(self, a: Poly, b: Poly) -> Poly:
        return tuple((x + y) % self.p for x, y in zip(a, b))

    def neg(self, a: Poly) -> Poly:
        return tuple(-x % self.p for x in a)

    def mul(self, a: Poly, b: Poly) -> Poly:
        c = [0] * self.d
        for i, x in enumerate(a):
            if x:
                for j in range(self.d - i):  # i + j >= d is truncated
                    c[i + j] += x * b[j]
        return tuple(v % self.p for v in c)

    def constant(self, c: int) -> Poly:
        return (c % self.p,) + (0,) * (self.d - 1)

    def compose(self, a: Poly, b: Poly) -> Poly:
        """a(b(X)) in the ring: Horner's rule, a_{d-1} b^{d-1} + ... + a_0 with every product truncated."""
        r = self.constant(0)
        for coef in reversed(a):
            r = self.add(self.mul(r, b), self.constant(coef))
        return r

    def random_poly(self, rng: random.Random) -> Poly:
        return tuple(rng.randrange(self.p) for _ in range(self.d))

    def apply(self, op: str, a: Poly, b: Poly) -> Poly:
        return {"add": self.add, "mul": self.mul, "compose": self.compose}[op](a, b)

    def __str__(self) -> str:
        return f"F{self.p}[X]/(X^{self.d})"


PAPER_RING = Ring()
add, neg, mul, constant, compose, random_poly = (PAPER_RING.add, PAPER_RING.neg, PAPER_RING.mul,
                                                 PAPER_RING.constant, PAPER_RING.compose, PAPER_RING.random_poly)


def random_expr(rng: random.Random, m: int, ring: Ring = PAPER_RING):
    """A random expression tree with exactly m operations, operators and operand coefficients uniform; the
    operations of a binary node are split between its sides uniformly. Trees are ('lit', poly),
    ('neg', e) or (op, left, right)."""
    if m == 0:
        return ("lit", ring.random_poly(rng))
    op = rng.choice(OPS)
    if op == "neg":
        return ("neg", random_expr(rng, m - 1, ring))
    k = rng.randrange(m)
    return (op, random_expr(rng, k, ring), random_expr(rng, m - 1 - k, ring))


def evaluate(e, ring: Ring = PAPER_RING) -> Poly:
    if e[0] == "lit":
        return e[1]
    if e[0] == "neg":
        return ring.neg(evaluate(e[1], ring))
    return ring.apply(e[0], evaluate(e[1], ring), evaluate(e[2], ring))


def fmt_poly(p: Poly) -> str:
    return "".join(str(c) for c in p)


def fmt_expr(e) -> str:
    if e[0] == "lit":
        return fmt_poly(e[1])
    if e[0] == "neg":
        return "-" + fmt_expr(e[1])
    return f"({fmt_expr(e[1])}{_SYMBOL[e[0]]}{fmt_expr(e[2])})"


def problem(rng: random.Random, m: int, ring: Ring = PAPER_RING) -> tuple[str, str, str]:
    """(prompt "EXPR=", answer digits, outermost operator) of a random m-operation expression."""
    e = random_expr(rng, m, ring)
    return fmt_expr(e) + "=", fmt_poly(evaluate(e, ring)), e[0]


def make_datasets(seed: int, train_size: int, test_per_m: int, train_ms=range(1, 6), test_ms=range(1, 11),
                  ring: Ring = PAPER_RING):
    """(training documents, test records). Test sets first, fixed by the seed, distinct within each m;
    training problems (m drawn uniformly from train_ms) whose expression is in a test set are redrawn, so the
    two are disjoint by expression string. A test record's groups are m and, for m = 1, the operator."""
    train_ms = list(train_ms)
    if not train_ms or min(train_ms) < 1:
        raise ValueError(f"training problems need at least 1 operation: train_max_m must be 1 or more, "
                         f"got training m = {train_ms}")
    rng = random.Random(f"polynomial-test-{seed}")
    tests, seen = [], set()
    for m in test_ms:
        taken, tries = 0, 0
        while taken < test_per_m:
            tries += 1
            if tries > 100 * test_per_m:
                raise ValueError(f"cannot draw {test_per_m} distinct test expressions with m={m}")
            prompt, answer, op = problem(rng, m, ring)
            if prompt not in seen:
                seen.add(prompt)
                tests.append({"prompt": prompt, "answer": answer, "m": m, **({"op": op} if m == 1 else {})})
                taken += 1
    rng = random.Random(f"polynomial-train-{seed}")
    docs = []
    while len(docs) < train_size:
        prompt, answer, _ = problem(rng, rng.choice(train_ms), ring)
        if prompt not in seen:
            docs.append(prompt + answer)
    return docs, tests


def digit_accuracy_by_m(completions: Path) -> dict[str, float]:
    """Share of the answer's coefficient digits the greedy completion gets right, by m (mtp-eval
    --completions): partial credit where exact match is still 0. Chance is 1/7."""
    right: dict[str, list[float]] = {}
    for line in completions.read_text().splitlines():
        r = json.loads(line)
        got = r["completion"].strip()
        right.setdefault(r["groups"]["m"], []).append(sum(a == b for a, b in zip(got, r["answer"])) / len(r["answer"]))
    return {m: sum(h) / len(h) for m, h in right.items()}
