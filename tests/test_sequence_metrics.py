import pytest
import torch

from dsp.metrics import char_accuracy, chunk_f1, letter_accuracy, word_accuracy

NAMES = ["O", "B-NP", "I-NP", "B-VP", "I-VP", "B-PP"]


def tags(*sentences: str, length: int | None = None) -> torch.Tensor:
    """Sentences of space-separated tag names -> `[N, T]` indices padded with -1."""
    rows = [[NAMES.index(t) for t in s.split()] for s in sentences]
    t_max = length or max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (t_max - len(r)) for r in rows])


def f1(p, r):
    return 2 * p * r / (p + r) if p + r else 0.0


def test_accuracies_hand_computed():
    target = torch.tensor([[0, 1, -1, -1], [2, 3, 4, 5]])
    # word 1: 1 of 2 right; word 2: 3 of 4 right; predictions at padding (9, 9) are ignored
    pred = torch.tensor([[0, 0, 9, 9], [2, 3, 4, 0]])
    assert char_accuracy(pred, target) == pytest.approx((50 + 75) / 2)
    assert letter_accuracy(pred, target) == pytest.approx(100 * 4 / 6)
    assert word_accuracy(pred, target) == 0.0
    pred[0, 1] = 1
    assert word_accuracy(pred, target) == pytest.approx(50.0)
    assert char_accuracy(target.clamp_min(0), target) == letter_accuracy(target, target) == 100.0


def test_accuracies_skip_empty_rows_and_empty_input():
    target = torch.tensor([[1, 2], [-1, -1]])
    pred = torch.tensor([[1, 0], [5, 5]])
    assert char_accuracy(pred, target) == pytest.approx(50.0)
    assert word_accuracy(pred, target) == 0.0
    empty = torch.full((2, 3), -1)
    assert char_accuracy(empty, empty) == letter_accuracy(empty, empty) == word_accuracy(empty, empty) == 0.0


def test_chunk_f1_perfect_and_padding_ignored():
    target = tags("B-NP I-NP B-VP O", "B-PP B-NP", length=5)
    pred = target.clone()
    pred[target < 0] = 3  # garbage at padded positions must not open chunks
    assert chunk_f1(pred, target, NAMES) == 100.0


def test_chunk_f1_i_after_o_starts_a_chunk():
    # IOB1 style: conlleval reads "O I-NP I-NP" as one NP chunk, the same span as "O B-NP I-NP"
    assert chunk_f1(tags("O I-NP I-NP"), tags("O B-NP I-NP"), NAMES) == 100.0
    # a lone I-VP is a chunk in the guess: 1 correct of 2 guessed, 1 of 1 true
    assert chunk_f1(tags("B-NP O I-VP"), tags("B-NP O O"), NAMES) == pytest.approx(f1(50, 100))


def test_chunk_f1_type_change_splits_chunks():
    # "B-NP I-VP": I-VP after a different type starts a VP chunk and ends the NP chunk
    assert chunk_f1(tags("B-NP I-VP"), tags("B-NP B-VP"), NAMES) == 100.0
    # the truth has one NP over both words; the guess NP covers only the first word: no match
    # (guessed chunks: NP[0], VP[1]; true: NP[0..1])
    assert chunk_f1(tags("B-NP I-VP"), tags("B-NP I-NP"), NAMES) == 0.0


def test_chunk_f1_boundaries_and_chunk_at_sentence_end():
    target = tags("B-NP I-NP O B-VP", "B-PP B-NP I-NP")
    # sentence 1: NP right, VP at the very end right; sentence 2: PP right, NP ends too early
    pred = tags("B-NP I-NP O B-VP", "B-PP B-NP O")
    # true chunks 4, guessed 4, correct 3
    assert chunk_f1(pred, target, NAMES) == pytest.approx(f1(75, 75))
    # B-NP B-NP is two chunks, not one
    assert chunk_f1(tags("B-NP B-NP"), tags("B-NP I-NP"), NAMES) == 0.0
    # a chunk open at the end of sentence 1 does not run into sentence 2
    assert chunk_f1(tags("O B-NP", "I-NP O"), tags("O B-NP", "B-NP O"), NAMES) == 100.0


def test_chunk_f1_all_o():
    all_o = tags("O O O", "O")
    assert chunk_f1(all_o, all_o, NAMES) == 0.0  # no chunks at all: P = R = 0
    # guessing nothing when there are chunks, or chunks when there are none, also scores 0
    assert chunk_f1(all_o, tags("B-NP O O", "B-VP"), NAMES) == 0.0
    assert chunk_f1(tags("B-NP O O", "B-VP"), all_o, NAMES) == 0.0


def test_chunk_f1_rejects_out_of_range_predictions():
    with pytest.raises(ValueError, match="not an index"):
        chunk_f1(torch.tensor([[len(NAMES)]]), torch.tensor([[0]]), NAMES)
