"""WordNet tasks from a synthetic WordNet-format fixture (no apt package needed), and the test split they use."""

import numpy as np
import pytest

from fedlora.config import DatasetConfig, PartitionConfig
from fedlora.data import wordnet
from fedlora.data.partition import partition_indices
from fedlora.data.sources import load_task_data
from fedlora.process_cache import clear_process_caches

LICENSE = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2   \n"
#: (part of speech, ss_type, lex_filenum) of the fixture's supersenses
CLASSES = [("noun", "n", 5), ("noun", "n", 6), ("noun", "n", 18), ("verb", "v", 29), ("verb", "v", 38),
           ("adj", "a", 0), ("adj", "s", 44), ("adv", "r", 2)]
PER_CLASS = 40


def synset_line(offset: int, lex: int, ss_type: str, words: list[str], gloss: str) -> str:
    """One data-file line as wndb(5WN) writes it: hex word count, lex_ids, a pointer, (verbs) a frame."""
    listed = " ".join(f"{w} {i % 16:x}" for i, w in enumerate(words))
    frames = " 01 + 02 00" if ss_type == "v" else ""
    return f"{offset:08d} {lex:02d} {ss_type} {len(words):02x} {listed} 001 @ 00001740 n 0000{frames} | {gloss}  \n"


def write_wordnet(directory):
    """data.noun/verb/adj/adv with PER_CLASS synsets per class of CLASSES, licence header first."""
    files = {pos: [LICENSE] for pos in wordnet.POS_FILES}
    for pos, ss_type, lex in CLASSES:
        for k in range(PER_CLASS):
            words = [f"{wordnet.LEXNAMES[lex].split('.')[1]}_word{k}", f"alt{k}(a)" if ss_type == "s" else f"alt{k}"]
            gloss = f'meaning {k} of class {lex}; with a semicolon; "an example {k}"; "another"'
            files[pos].append(synset_line(1000 * lex + k, lex, ss_type, words, gloss))
    for pos, lines in files.items():
        (directory / f"data.{pos}").write_text("".join(lines))
    return directory


@pytest.fixture
def fixture_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(wordnet.WORDNET_DIR_ENV, str(write_wordnet(tmp_path)))
    wordnet.read_synsets.cache_clear()
    clear_process_caches()
    yield tmp_path
    wordnet.read_synsets.cache_clear()
    clear_process_caches()


def test_parse_line_reads_hex_counts_markers_and_the_definition():
    words = [f"w{i}" for i in range(11)]  # 0x0b words: a decimal reading fails
    synset = wordnet.parse_line(synset_line(1740, 44, "s", words[:-1] + ["last_word(ip)"],
                                            'a definition; with a part; "quoted example"; "two"'), "adj")
    assert synset.lexname == "adj.ppl" and synset.pos == "adj"
    assert synset.lemmas == tuple(words[:-1]) + ("last word",)
    assert synset.definition == "a definition; with a part"
    with pytest.raises(ValueError, match="lex_filenum 45"):
        wordnet.parse_line(synset_line(1, 45, "n", ["x"], "g"), "noun")
    with pytest.raises(ValueError, match="not a WordNet synset line"):
        wordnet.parse_line("00001740 03 n 01 entity 0 000 no gloss bar", "noun")


def test_lexnames_are_the_45_lexicographer_files():
    assert len(wordnet.LEXNAMES) == 45 == len(set(wordnet.LEXNAMES))
    assert wordnet.LEXNAMES[0] == "adj.all" and wordnet.LEXNAMES[3] == "noun.Tops" and wordnet.LEXNAMES[44] == "adj.ppl"


def test_both_datasets_from_the_fixture(fixture_dir):
    data, labels = wordnet.load_wordnet(wordnet.SUPERSENSES)
    assert labels == tuple(wordnet.LEXNAMES[lex] for lex in sorted(lex for _, _, lex in CLASSES))
    assert len(data) == len(CLASSES) * PER_CLASS
    row = data[0]
    assert row["text"] == "noun: animal word0, alt0: meaning 0 of class 5; with a semicolon"
    assert labels[row["label"]] == row["topic"] == "noun.animal" and row["pos"] == "noun"
    satellite = next(r for r in data if r["topic"] == "adj.ppl")
    assert "(a)" not in satellite["text"]
    definitions, none = wordnet.load_wordnet(wordnet.DEFINITIONS)
    assert none == () and definitions[0]["prompt"] == 'Define the noun "animal word0".'
    assert definitions[0]["response"] == "meaning 0 of class 5; with a semicolon"


def test_missing_package_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(wordnet.WORDNET_DIR_ENV, str(tmp_path / "absent"))
    clear_process_caches()
    with pytest.raises(FileNotFoundError) as err:
        load_task_data(DatasetConfig(name=wordnet.SUPERSENSES), 0)
    message = str(err.value)
    assert "\n" not in message and wordnet.INSTALL_COMMAND in message and "data.noun" in message
    clear_process_caches()


def test_test_split_is_fixed_across_run_seeds_and_disjoint(fixture_dir):
    cfg = DatasetConfig(name=wordnet.SUPERSENSES, test_fraction=0.25, eval_fraction=0.2, split_seed=3)
    a, b = load_task_data(cfg, 0), load_task_data(cfg, 1)
    assert list(a.test["text"]) == list(b.test["text"]) and len(a.test) == len(CLASSES) * PER_CLASS // 4
    assert list(a.heldout["text"]) != list(b.heldout["text"])  # validation and training rows follow the run seed
    for data in (a, b):
        assert not set(data.test["text"]) & (set(data.train["text"]) | set(data.heldout["text"]))
        assert len(data.train) + len(data.heldout) + len(data.test) == len(CLASSES) * PER_CLASS
    counts = np.bincount(np.asarray(a.test["label"]), minlength=len(CLASSES))
    assert counts.tolist() == [PER_CLASS // 4] * len(CLASSES)  # stratified by label
    other = load_task_data(DatasetConfig(name=wordnet.SUPERSENSES, test_fraction=0.25, eval_fraction=0.2, split_seed=4), 0)
    assert list(other.test["text"]) != list(a.test["text"])
    assert len(load_task_data(DatasetConfig(name=wordnet.SUPERSENSES), 0).test) == 0


def test_natural_partition_by_part_of_speech(fixture_dir):
    data = load_task_data(DatasetConfig(name=wordnet.SUPERSENSES), 0)
    parts = partition_indices(data.train, PartitionConfig(kind="natural", column="pos"), 4, seed=0)
    pos = np.asarray(data.train["pos"])
    assert sorted(len(set(pos[p])) for p in parts) == [1, 1, 1, 1]
