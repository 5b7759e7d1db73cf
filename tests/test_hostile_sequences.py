"""Hostile sequence data: what ``unitrain.text.save_tokens`` is given and what a token dataset
file holds. What ``load_tokens`` refuses is never written (a file saved once and unreadable
ever after), each refusal one line naming the value; the text and window cases are in
``test_hostile_models.py`` and ``test_text.py``."""

import pytest
from test_hostile_runs import one_error_line, run_cli

from unitrain import text
from unitrain.data import DataError

SAVES = {  # save_tokens' arguments -> the line's words
    "fewer labels than sequences": (
        dict(sequences=[[1, 2], [3]], labels=[1]),
        "save_tokens: 1 labels for 2 sequences (int64 (1,)); expected one number per sequence",
    ),
    "labels as words": (
        dict(sequences=[[1, 2], [3]], labels=["good", "bad"]),
        "save_tokens: 2 labels for 2 sequences (<U4 (2,)); expected one number per sequence",
    ),
    "one label for all": (dict(sequences=[[1, 2], [3]], labels=1), "save_tokens: not a list of labels"),
    "a negative padding id": (dict(sequences=[[1, 2], [3]], padding=-1), "save_tokens: padding: token id -1 is"),
    "an empty sequence": (  # was named as "float64 (0,)" ids
        dict(sequences=[[1, 2], []]),
        "save_tokens: sequence 1 is empty; expected at least one token",
    ),
}


@pytest.mark.parametrize("case", SAVES)
def test_save_tokens_writes_nothing_that_load_tokens_would_refuse(tmp_path, case):
    arguments, words = SAVES[case]
    with pytest.raises(DataError) as caught:
        text.save_tokens(tmp_path / "tokens.npz", **arguments)
    assert str(caught.value).startswith(words) and "\n" not in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_a_token_dataset_given_as_a_training_set_is_one_line(tmp_path, capsys):
    """``--dataset`` reads images; a token dataset is named as what it is not."""
    text.save_tokens(tmp_path / "tokens.npz", [[1, 2, 3], [4]])
    status, _, err = run_cli(capsys, "train", "--dataset", str(tmp_path / "tokens.npz"), "--max-steps", "1")
    assert status == 2
    one_error_line(err, "holds the arrays ['lengths', 'tokens']; expected exactly x_train, y_train, x_test, y_test")
