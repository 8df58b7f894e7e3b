"""Datasets: the embedded Wikipedia split, local files, c4 / wikitext2 code paths on
local stand-ins for `datasets.load_dataset`, and the token helpers."""

import json

import pytest
import torch

from blocksparse.integration import data
from blocksparse.integration.data import (
    DatasetError, calibration_samples, eval_tokens, load_documents, load_text, train_token_blocks)
from helpers import byte_tokenizer


def byte_ids(text):
    tok = byte_tokenizer()
    return torch.tensor(tok(text).input_ids)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_byte_tokenizer_is_one_token_per_byte(tokenizer):
    text = "Zürich, 1999.\n\nNext"
    assert len(tokenizer(text).input_ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(tokenizer(text).input_ids) == text


# ----------------------------------------------------------- embedded Wikipedia

@pytest.fixture(scope="module")
def wiki_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLOCKSPARSE_CACHE", str(root))
        yield root


# The held-out articles: pinned, since published perplexities depend on them.
EVAL_TITLES = ['Algorithm', 'Affirming the consequent', 'Actinopterygii', 'Austroasiatic languages',
               'Animal (disambiguation)', 'Atlantic Ocean', 'Ampere', 'Alberta',
               'Afroasiatic languages', 'Azerbaijan', 'List of anthropologists', 'Aldous Huxley',
               'International Atomic Time', 'Ambiguity', 'Art']


def _titles(directory, split):
    return [json.loads(line)["title"] for line in open(directory / f"{split}.jsonl", encoding="utf-8")]


def test_default_corpus_split_is_pinned_disjoint_and_cached(wiki_cache):
    directory = data.default_corpus_dir()
    assert directory.parent.parent == wiki_cache
    titles = {split: _titles(directory, split) for split in data.SPLITS}
    assert titles["eval"] == EVAL_TITLES
    assert (len(titles["calib"]), len(titles["train"])) == (8, 83)
    assert not (set(titles["eval"]) & set(titles["calib"]) | set(titles["eval"]) & set(titles["train"])
                | set(titles["calib"]) & set(titles["train"]))
    chars = {split: len(load_text("default", split)) for split in data.SPLITS}
    total = sum(chars.values())
    assert 0.12 <= chars["eval"] / total < 0.16
    assert 0.10 <= chars["calib"] / total < 0.14
    # Read from the cache from now on: extraction is not run again.
    assert data.default_corpus_dir() == directory
    assert list(wiki_cache.joinpath("data").iterdir()) == [directory]  # no temporary leftovers


def test_default_corpus_is_clean_prose(wiki_cache):
    text = load_text("default", "eval")
    assert text.startswith("Algorithm\n\n")
    for markup in ("[[", "]]", "{{", "}}", "'''", "<ref", "== "):
        assert markup not in text
    paragraphs = text.split("\n\n")
    assert len(paragraphs) > 200
    assert "Austroasiatic languages" in paragraphs


def test_split_articles_is_deterministic_and_order_free():
    articles = [(f"Title {i}", "word " * (10 + i)) for i in range(40)]
    parts = data.split_articles(articles)
    assert parts == data.split_articles(list(reversed(articles)))
    assert sorted(a for part in parts.values() for a in part) == sorted(articles)
    assert all(parts[split] for split in data.SPLITS)


def test_clean_wiki_article():
    wikitext = ("'''Foo''' is a [[bar|baz]] thing ({{lang|x}}) that has many words in it , truly .\n"
                "== History ==\n"
                "Short caption\n"
                "* A list item that also has more than ten words in it, so it stays.\n"
                "== Empty ==\n"
                "tiny\n"
                "== See also ==\n"
                "Everything after See also is dropped even when it is a long sentence here.\n")
    assert data.clean_wiki_article(wikitext) == [
        "Foo is a baz thing that has many words in it, truly.",
        "History",
        "A list item that also has more than ten words in it, so it stays.",
    ]


def test_default_news_is_lee_corpus():
    docs = load_documents("default-news", "eval")
    assert len(docs) == 300
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert load_text("default-news", "eval") == "\n\n".join(docs)


# ------------------------------------------------------------------ local files

def test_local_txt_and_jsonl(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("one\ntwo\n", encoding="utf-8")
    for split in data.SPLITS:
        assert load_text(str(txt), split) == "one\ntwo\n"
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n', encoding="utf-8")
    assert load_documents(str(jsonl), "train") == ["first", "second"]
    assert load_text(str(jsonl), "eval") == "first\n\nsecond"


def test_bad_inputs_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: expected an object with a string field \"text\""):
        load_documents(str(bad), "eval")
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: not valid JSON"):
        load_documents(str(bad), "eval")
    with pytest.raises(DatasetError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"), "eval")
    (tmp_path / "notes.md").write_text("# notes", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"notes.md': expected a .txt or .jsonl file, got '.md'"):
        load_documents(str(tmp_path / "notes.md"), "eval")
    with pytest.raises(DatasetError, match=r"unknown dataset 'ptb': expected one of default, default-news, c4, wikitext2"):
        load_documents("ptb", "eval")
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        load_documents("default-news", "test")


# ------------------------------------------- c4 / wikitext2 without the network

@pytest.fixture
def fake_hub(monkeypatch):
    """Stand in for datasets.load_dataset: record the request, serve local documents."""
    import datasets

    served = {
        ("allenai/c4", "train"): [f"c4 train document {i} " + "x" * (i % 7) * 20 for i in range(50)],
        ("allenai/c4", "validation"): [f"val{i}" for i in range(1200)],
        ("wikitext", "train"): [" = Title = \n", " first line \n", ""],
        ("wikitext", "test"): [" = Test = \n", " body \n", ""],
    }
    calls = []

    def load_dataset(path, name=None, data_files=None, split=None):
        calls.append((path, name, data_files, split))
        return datasets.Dataset.from_dict({"text": served[(path, split)]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return served, calls


def test_c4_uses_the_wanda_shards(fake_hub):
    served, calls = fake_hub
    assert list(load_documents("c4", "train")) == served[("allenai/c4", "train")]
    assert load_text("c4", "eval") == " ".join(f"val{i}" for i in range(1100))
    assert calls == [
        ("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz"}, "train"),
        ("allenai/c4", None, {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation"),
    ]


def test_wikitext2_uses_raw_v1_and_joins_test_with_blank_lines(fake_hub):
    _, calls = fake_hub
    assert load_text("wikitext2", "eval") == " = Test = \n\n\n body \n\n\n"
    assert load_text("wikitext2", "calib") == " = Title = \n  first line \n "
    assert calls == [("wikitext", "wikitext-2-raw-v1", None, "test"),
                     ("wikitext", "wikitext-2-raw-v1", None, "train")]


def test_unreachable_hub_names_offline_alternatives(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError, match=r"cannot load allenai/c4 \(validation\).*ConnectionError.*"
                                           r"Offline alternatives: --dataset default .*\.txt / \.jsonl"):
        load_text("c4", "eval")


def test_c4_calibration_takes_windows_inside_long_documents(fake_hub, tokenizer):
    served, _ = fake_hub
    seqlen = 40
    samples = calibration_samples(tokenizer, "c4", nsamples=6, seqlen=seqlen, seed=3)
    assert samples.shape == (6, seqlen) and samples.dtype == torch.long
    long_docs = [d for d in served[("allenai/c4", "train")] if len(d) > seqlen]
    for window in samples:
        text = tokenizer.decode(window)
        assert any(text in doc for doc in long_docs)
    assert torch.equal(samples, calibration_samples(tokenizer, "c4", nsamples=6, seqlen=seqlen, seed=3))


def test_c4_calibration_without_long_documents_fails(fake_hub, tokenizer):
    with pytest.raises(DatasetError, match="no c4 document longer than seqlen 4096"):
        calibration_samples(tokenizer, "c4", nsamples=1, seqlen=4096)


# ------------------------------------------------------------------------ tokens

@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    docs = [f"Document number {i} says something different: {'abc' * i}." for i in range(30)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path), docs


def test_eval_tokens_is_the_whole_eval_text(corpus, tokenizer):
    path, docs = corpus
    tokens = eval_tokens(tokenizer, path)
    assert tokens.shape == (1, len("\n\n".join(docs).encode()))
    assert torch.equal(tokens[0], byte_ids("\n\n".join(docs)))


def test_calibration_windows_are_seeded_slices(corpus, tokenizer):
    path, docs = corpus
    stream = byte_ids("\n\n".join(docs))
    samples = calibration_samples(tokenizer, path, nsamples=16, seqlen=64, seed=0)
    assert samples.shape == (16, 64)
    starts = []
    for window in samples:
        matches = [s for s in range(stream.numel() - 64) if torch.equal(stream[s:s + 64], window)]
        assert matches
        starts.append(matches[0])
    assert len(set(starts)) > 8  # random positions, not one repeated window
    assert torch.equal(samples, calibration_samples(tokenizer, path, nsamples=16, seqlen=64, seed=0))
    assert not torch.equal(samples, calibration_samples(tokenizer, path, nsamples=16, seqlen=64, seed=1))


def test_calibration_text_too_short(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("x" * 100, encoding="utf-8")
    with pytest.raises(DatasetError, match=r"has 100 tokens, fewer than the 129 needed"):
        calibration_samples(tokenizer, str(path), nsamples=4, seqlen=128)


def test_train_blocks_concatenate_documents_like_run_clm(corpus, tokenizer):
    path, docs = corpus
    stream = torch.cat([byte_ids(d) for d in docs])  # no separator between documents
    blocks = train_token_blocks(tokenizer, path, block_size=100)
    assert blocks.shape == (stream.numel() // 100, 100)
    assert torch.equal(blocks.flatten(), stream[:blocks.numel()])
    first = train_token_blocks(tokenizer, path, block_size=100, max_samples=3, tokenize_batch=2)
    assert torch.equal(first, blocks[:3])
    with pytest.raises(DatasetError, match=rf"has {stream.numel()} tokens, fewer than the 100000 needed"):
        train_token_blocks(tokenizer, path, block_size=100000)
