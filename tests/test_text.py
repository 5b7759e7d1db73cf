"""Text data for language models: vocabularies, windows with next-token targets, the contiguous
validation tail, the shipped text (checked against its recorded digest), token datasets with lengths
and their refusals, perplexity."""

import hashlib
import io
import math
import zipfile

import numpy as np
import pytest
from unitrain.conformance.tolerances import tolerance

from unitrain import text
from unitrain.data import DataError


def test_shipped_text_is_the_recorded_file():
    shipped = text.shipped_text()
    _, digest = text.SHIPPED["tz-news"]
    assert hashlib.sha256(shipped.encode("utf-8")).hexdigest() == digest
    assert len(shipped) == 238817 and shipped.startswith("News for the tz database")


@pytest.mark.parametrize(("level", "size"), [("char", 10), ("word", 5)])
def test_vocabulary_round_trips_and_refuses_unknown_tokens(level, size):
    sample = "the cat sat on the mat"
    vocabulary = text.Vocabulary.of(sample, level)
    assert len(vocabulary) == len(set(sample if level == "char" else sample.split())) == size
    assert list(vocabulary.tokens) == sorted(vocabulary.tokens)
    assert vocabulary.decode(vocabulary.encode(sample)) == sample
    with pytest.raises(DataError, match="'dog' is not in the vocabulary of 5 word tokens" if level == "word" else
                       "'d' is not in the vocabulary of 10 char tokens"):  # fmt: skip
        vocabulary.encode("the dog")


def test_windows_are_consecutive_with_next_token_targets():
    ids = np.arange(20)
    data = text.windows(ids, 6)
    np.testing.assert_array_equal(data.x, [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]])
    np.testing.assert_array_equal(data.y, data.x + 1)
    assert text.windows(ids, 6, stride=2).x.shape == (7, 6)
    with pytest.raises(DataError, match="5 tokens cannot make one window of 5 inputs"):
        text.windows(np.arange(5), 5)
    with pytest.raises(DataError, match="length must be an integer >= 1, got 0"):
        text.windows(ids, 0)


def test_language_model_data_validates_on_the_texts_tail():
    sample = "abcdefghij" * 10
    data = text.language_model_data(sample, 4, val_fraction=0.2)
    assert data.vocabulary.decode(data.train.x[0]) == "abcd"
    assert data.vocabulary.decode(data.val.x[0]) == sample[80:84]  # the last fifth, from its start
    assert (len(data.train), len(data.val)) == (19, 4)
    with pytest.raises(DataError, match="val_fraction must be a number between 0 and 1, got 1"):
        text.language_model_data(sample, 4, val_fraction=1)


def test_perplexity_is_exp_of_the_mean_token_loss():
    # a float64 logarithm and its exponential: a rounding each, the second scaled by the value
    assert text.perplexity(math.log(12.5)) == pytest.approx(12.5, rel=0, abs=tolerance(np.float64, 2, 12.5))
    assert text.perplexity({"loss": 0.0, "accuracy": 1.0}) == 1.0


def test_token_dataset_round_trips(tmp_path):
    path = tmp_path / "tokens.npz"
    text.save_tokens(path, [[3, 1, 4, 1], [5, 9], [2]], labels=[0, 1, 0], padding=0)
    tokens, lengths, labels = text.load_tokens(path)
    np.testing.assert_array_equal(tokens, [[3, 1, 4, 1], [5, 9, 0, 0], [2, 0, 0, 0]])
    np.testing.assert_array_equal(lengths, [4, 2, 1])
    np.testing.assert_array_equal(labels, [0, 1, 0])


INTS = np.zeros((2, 3), np.int64)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"tokens": INTS, "lengths": np.array([3, 4])}, "length 4 is outside 1..3 (the padded axis)"),
        ({"tokens": INTS, "lengths": np.array([0, 2])}, "length 0 is outside 1..3 (the padded axis)"),
        ({"tokens": np.zeros((2, 3)), "lengths": np.array([1, 2])}, "tokens must be integer ids of shape (N, T)"),
        ({"tokens": INTS, "lengths": np.array([1])}, "lengths must be 2 integers, got int64 (1,)"),
        ({"tokens": INTS}, "needs the arrays tokens and lengths; missing lengths"),
        ({"tokens": INTS, "lengths": np.array([1, 2]), "labels": np.zeros(3)}, "3 labels for 2"),
    ],
)  # fmt: skip
def test_bad_token_datasets_are_refused_in_one_line(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as error:
        text.load_tokens(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_hostile_token_files_are_refused_in_one_line_before_reading_data(tmp_path):
    with pytest.raises(DataError, match=r"tokens.npz does not exist$"):
        text.load_tokens(tmp_path / "tokens.npz")
    with pytest.raises(DataError, match=r"is a directory, expected an .npz file$"):
        text.load_tokens(tmp_path)
    # a header declaring 8 TiB of tokens in a file of a few hundred bytes: refused from the header
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,), np.int64))
    header["shape"] = (1 << 20, 1 << 20)
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    with zipfile.ZipFile(tmp_path / "big.npz", "w") as archive:
        archive.writestr("tokens.npy", member.getvalue())
        archive.writestr("lengths.npy", _npy(np.ones(3, np.int64)))
    with pytest.raises(DataError, match=r"tokens declares shape \(1048576, 1048576\).*at most"):
        text.load_tokens(tmp_path / "big.npz")


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
