"""The induction recipe's story generator (names are two reserved byte tokens) and its teacher-forced metric."""

import json
import random

import pytest
import torch

from conftest import tiny_model_config
from mtplm.model.transformer import MTPTransformer
from mtplm.recipes import induction as I
from mtplm.recipes.induction_eval import next_token_hits


def test_names_are_two_tokens_that_occur_nowhere_else():
    rng = random.Random(0)
    for _ in range(300):
        text = I.story(rng)
        data = text.encode("utf-8")
        names = {c for c in text if ord(c) > 127}
        assert 2 <= len(names) <= 3
        assert len({n.encode()[0] for n in names}) == len(names)  # distinct first tokens
        for n in names:
            b = n.encode()
            assert len(b) == 2 and b[0] in I.LEAD_BYTES and b[1] in I.CONT_BYTES
            assert text.count(n) >= 2  # recurs within the story
        # every byte >= 0x80 belongs to a name; the rest of the story is ASCII
        rest = text
        for n in names:
            rest = rest.replace(n, "")
        assert rest.isascii() and sum(b >= 0x80 for b in data) == 2 * sum(text.count(n) for n in names)


def test_dense_stories_name_characters_more_often():
    """The CPU analogue: the same two-token names, 3 or 4 characters, short sentences; names are a larger share of
    the bytes than in the paper-style stories, and the held-out split holds for them too."""
    rng = random.Random(1)
    share = {}
    for style in I.STYLES:
        texts = [I.story(rng, style) for _ in range(200)]
        share[style] = sum(sum(b >= 0x80 for b in t.encode()) / len(t.encode()) for t in texts) / len(texts)
    assert share["dense"] > 1.5 * share["paper"]
    for _ in range(200):
        text = I.story(rng, "dense")
        names = {c for c in text if ord(c) > 127}
        assert 3 <= len(names) <= 4 and len({n.encode()[0] for n in names}) == len(names)
        assert all(text.count(n) >= 2 for n in names) and "".join(c for c in text if c not in names).isascii()
    train, test = I.make_datasets(1, 300, 30, "dense")
    assert not set(train) & set(test) and I.make_datasets(1, 5, 30, "dense")[1] == test
    with pytest.raises(ValueError, match="story style must be one of paper, dense"):
        I.make_datasets(1, 5, 5, "sparse")


def test_name_positions_by_hand():
    a, b = I.name_of(0xC5, 0x81), I.name_of(0xD0, 0xBF)
    tokens = list(f"{a} saw {b}. {a} and {b} met {a}.".encode())
    # counted by hand: a at bytes 0, 11, 25 (a name is two bytes), b at 7, 18
    assert [tokens[p] for p in (0, 11, 25)] == [0xC5] * 3 and [tokens[p] for p in (7, 18)] == [0xD0] * 2
    assert I.name_positions(tokens) == [(11, 2), (18, 2), (25, 3)]
    assert [I.occurrence_group(k) for k in (2, 3, 4, 9)] == ["2", "3", "4+", "4+"]


def test_test_stories_are_held_out_and_fixed():
    train, test = I.make_datasets(1, 500, 50)
    assert len(test) == 50 and not set(train) & set(test)
    assert I.make_datasets(1, 5, 50)[1] == test
    assert len(set(train)) == len(train)  # no memorisable repeats


class _Echo(torch.nn.Module):
    """Predicts token t + 1 at every position: a model whose hits can be counted by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        return type("Out", (), {"logits": torch.nn.functional.one_hot((tokens + 1) % 256, 256).float()})


def test_hits_by_hand():
    seqs = [[5, 6, 9, 10, 11], [1, 2]]
    assert next_token_hits(_Echo(), seqs, [[0, 1, 2, 3], [0]], batch_size=2) == [[True, False, True, True], [True]]


def test_hits_match_single_sequence_forward():
    """Batched and right-padded against each sequence alone through the real model's forward."""
    torch.manual_seed(0)
    model = MTPTransformer(tiny_model_config(vocab_size=256, n_future_tokens=2)).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (9, 30, 17)]
    positions = [list(range(len(s) - 1)) for s in seqs]
    hits = next_token_hits(model, seqs, positions, batch_size=3)
    for s, h in zip(seqs, hits):
        with torch.no_grad():
            pred = model(torch.tensor([s])).logits[0].argmax(-1)
        assert h == [int(pred[p]) == s[p + 1] for p in range(len(s) - 1)]
    # a model that always predicts the right token scores every position
    assert json.dumps(next_token_hits(_Echo(), [[3, 4, 5]], [[0, 1]])) == "[[true, true]]"


def test_copy_diagnosis_tells_copying_a_name_from_induction():
    """At the third name below (lead 0xC5 again), induction answers 0x81; copying without matching the lead byte
    answers 0x81 or 0x90 (each earlier name's second byte), right half the time."""
    from mtplm.recipes.induction_eval import copy_diagnosis

    seq = [0xC5, 0x81, ord(" "), 0xD0, 0x90, ord(" "), 0xC5, 0x81]
    assert copy_diagnosis(seq, 6, 0x81, I.LEAD_BYTES) == (True, 0.5)  # right, and a copy
    assert copy_diagnosis(seq, 6, 0x90, I.LEAD_BYTES) == (True, 0.5)  # wrong name copied
    assert copy_diagnosis(seq, 6, ord("x"), I.LEAD_BYTES) == (False, 0.5)
