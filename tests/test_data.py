import numpy as np
import pytest
import tensorflow_datasets as tfds

from aigc_jax.data.text import EMBEDDED_CHARS, CharDataset, CharVocab, load_text
from aigc_jax.errors import UserError


def test_text_file_source(text_file):
  assert load_text(f"text_file:{text_file}").startswith("First Citizen:\n")


@pytest.mark.parametrize("source, message", [
    ("text_file:/no/such/file.txt", "does not exist"),
    ("hub:shakespeare", "Unknown data.source 'hub:shakespeare'"),
    ("embedded:wikipedia", "Unknown embedded data set"),
])
def test_bad_source_is_one_clear_sentence(source, message):
  with pytest.raises(UserError, match=message):
    load_text(source)


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError) as error:
    load_text("text_file:data/input.txt")
  assert str(error.value) == (f"Text file 'data/input.txt' does not exist in {tmp_path} (a relative path is read from "
                              f"the current directory, and a run keeps data.source as given: run from where it "
                              f"trained, or train with an absolute path); check data.source=text_file:PATH.")
  with pytest.raises(UserError, match=r"^Text file '/no/such.txt' does not exist; check data.source=text_file:PATH"):
    load_text("text_file:/no/such.txt")  # an absolute path needs no such note


def test_embedded_default_is_real_python_source():
  text = load_text("embedded:python_stdlib")
  assert len(text) == EMBEDDED_CHARS
  assert "def " in text and "import " in text
  assert load_text("embedded:python_stdlib") == text  # deterministic


def test_tfds_source_joins_the_text_of_every_example():
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    source = tfds.data_source("tiny_shakespeare", split="train")
    expected = "".join(source[i]["text"] for i in range(3))
    text = load_text("tfds:tiny_shakespeare")
  assert len(expected) > 0 and text == expected


def test_tfds_unknown_name_is_one_clear_sentence():
  with pytest.raises(UserError, match="TFDS has no data set 'no_such_dataset'"):
    load_text("tfds:no_such_dataset")


def test_vocab_round_trip_and_unknown_character():
  vocab = CharVocab.from_text("hello world")
  assert vocab.chars == " dehlorw"
  ids = vocab.encode("hello")
  np.testing.assert_array_equal(ids, [3, 2, 4, 4, 5])
  assert vocab.decode(ids) == "hello"
  with pytest.raises(UserError, match=r"outside the model's vocabulary \('Z'\)"):
    vocab.encode("helloZ")


def test_split_and_batches_are_pure_functions_of_the_step():
  text = "".join(chr(ord("a") + i % 26) for i in range(1000))
  data = CharDataset(text, CharVocab.from_text(text), seq_len=8, val_fraction=0.1)
  assert len(data.splits["train"]) == 900 and len(data.splits["validation"]) == 100
  a = data.batch("train", 5, 4, seed=0)
  b = data.batch("train", 5, 4, seed=0)
  c = data.batch("train", 6, 4, seed=0)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(a["inputs"], c["inputs"])
  assert a["inputs"].shape == (4, 8) and a["targets"].shape == (4, 8)
  np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])  # targets are inputs shifted by one
  assert not np.array_equal(data.batch("train", 5, 4, seed=0, stream=1)["inputs"], a["inputs"])
  rows = data.batch("train", 5, 4, seed=0, rows=slice(1, 3))  # what a process holding rows 1 and 2 builds
  for name in ("inputs", "targets"):
    np.testing.assert_array_equal(rows[name], a[name][1:3])


def test_split_too_short_for_a_window():
  with pytest.raises(UserError, match="fewer than one window"):
    CharDataset("abcdefghij" * 2, CharVocab.from_text("abcdefghij"), seq_len=8, val_fraction=0.1)
