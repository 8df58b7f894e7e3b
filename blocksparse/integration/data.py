"""Text for calibration, fine-tuning and evaluation: named datasets and local files.

Datasets (the `--dataset` / `--calib` value):
  default       English Wikipedia sample shipped inside the gensim wheel (offline).
                Articles are cleaned into paragraphs once, cached, and split
                deterministically by article into calib / train / eval parts.
  default-news  the Lee news corpus beside it (out-of-domain evaluation text).
  c4            allenai/c4 through `datasets`, the Wanda shards: train shard 00000
                for calib/train, validation shard 00000 (first 1100 documents
                joined by " ") for eval, scored on its first 256 windows.
  wikitext2     wikitext-2-raw-v1 through `datasets`: train split for calib/train,
                test split joined by "\\n\\n" for eval (the Wanda convention).
  PATH          a local .txt file (one document) or .jsonl file (field "text" per
                line); the same text serves every split.

Splits: "calib", "train", "eval". Datasets without a split of their own
(default-news, local files) return the same text for all three.

Token helpers follow the references: `calibration_samples` draws random windows
like Wanda (per document for c4), `eval_tokens` is the whole eval text,
`train_token_blocks` concatenates documents and chunks them like run_clm.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import random
import re
from pathlib import Path
from typing import Sequence

import torch

from .cache import atomic_directory, cache_root

SPLITS = ("calib", "train", "eval")
# name -> what it is, for help strings and errors.
NAMED_DATASETS = {
    "default": "embedded Wikipedia sample, offline",
    "default-news": "embedded Lee news corpus, offline, out of domain",
    "c4": "allenai/c4, the Wanda shards",
    "wikitext2": "wikitext-2-raw-v1",
}
OFFLINE_ALTERNATIVES = "--dataset default (embedded Wikipedia), default-news, or a local .txt / .jsonl path"


def dataset_help(default: str = "default") -> str:
    """The `--dataset`-style flags' help: every named dataset, then local files."""
    names = ", ".join(f"{name} ({what})" for name, what in NAMED_DATASETS.items())
    return f"{names}, or a local .txt/.jsonl path (default: {default})"

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
# Bump when extraction or splitting changes, so stale caches are not reused.
WIKI_CACHE_NAME = "enwiki-gensim-v1"
# Fractions of article text (characters) for the held-out eval and the calibration
# parts; the rest is train. Articles are ordered by a hash of their title first.
WIKI_EVAL_FRACTION = 0.12
WIKI_CALIB_FRACTION = 0.10
# Trailing sections that are lists of links and citations, not prose.
WIKI_END_SECTIONS = {"see also", "references", "notes", "further reading", "external links",
                     "bibliography", "sources", "footnotes", "citations", "notes and references"}
MIN_PARAGRAPH_WORDS = 10

C4_REPO = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256  # Wanda scores the first 256 windows of the C4 validation text
WIKITEXT_REPO, WIKITEXT_CONFIG = "wikitext", "wikitext-2-raw-v1"


class DatasetError(ValueError):
    """A dataset name, split or file that cannot be used, or text too short for the request."""


# --------------------------------------------------------------------------- text

def load_documents(dataset: str, split: str) -> Sequence[str]:
    """The documents of `split` of `dataset` (see the module docstring for names): a list,
    or for c4 / wikitext2 the lazy `datasets` column (len, indexing, slicing)."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if dataset == "default":
        return _wiki_split(split)
    if dataset == "default-news":
        text = (_gensim_test_data() / NEWS_FILE).read_text(encoding="utf-8")
        return [line.strip() for line in text.splitlines() if line.strip()]
    if dataset == "c4":
        if split == "eval":
            docs = _hf_dataset(C4_REPO, None, {"validation": C4_VALIDATION_FILE}, "validation")
            return list(docs[:C4_EVAL_DOCUMENTS]["text"])
        # A lazy column: the shard holds ~356k documents and calibration reads a few.
        return _hf_dataset(C4_REPO, None, {"train": C4_TRAIN_FILE}, "train")["text"]
    if dataset == "wikitext2":
        return _hf_dataset(WIKITEXT_REPO, WIKITEXT_CONFIG, None, "test" if split == "eval" else "train")["text"]
    path = Path(dataset).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise DatasetError(f"dataset file {str(path)!r} does not exist")
        return _local_documents(path)
    if path.is_file():
        raise DatasetError(f"dataset file {str(path)!r}: expected a .txt or .jsonl file, got {path.suffix or 'no suffix'!r}")
    raise DatasetError(f"unknown dataset {dataset!r}: expected one of {', '.join(NAMED_DATASETS)} "
                       f"or a path to a .txt / .jsonl file")


def _separator(dataset: str, split: str) -> str:
    # Wanda joins C4 validation and WikiText-2 train with " ", WikiText-2 test with "\n\n".
    if dataset == "c4" or (dataset == "wikitext2" and split != "eval"):
        return " "
    return "\n\n"


def load_text(dataset: str, split: str) -> str:
    """The documents of `split` joined into one string (separators as in Wanda)."""
    return _separator(dataset, split).join(load_documents(dataset, split))


def _local_documents(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    documents = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DatasetError(f'{path}:{number}: expected an object with a string field "text"')
            documents.append(record["text"])
    return documents


def _hf_dataset(repo: str, config: str | None, data_files: dict | None, split: str):
    """`datasets.load_dataset`, with a clear error when it cannot be reached (offline)."""
    import datasets

    try:
        return datasets.load_dataset(repo, config, data_files=data_files, split=split)
    except Exception as err:  # offline shows up as ConnectionError, OSError, HfHubHTTPError, ...
        raise DatasetError(f"cannot load {repo}{'/' + config if config else ''} ({split}) through "
                           f"`datasets`: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
                           f"Offline alternatives: {OFFLINE_ALTERNATIVES}") from err


# --------------------------------------------------------------- default corpus

def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the default datasets need the PyPI package gensim (pip install gensim)")
    return Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"


_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1$")


def clean_wiki_article(wikitext: str) -> list[str]:
    """Readable paragraphs of one article: markup stripped by gensim's filter_wiki, then
    headings kept only before prose, list bullets and bold/italic quotes removed,
    fragments (captions, table cells) under MIN_PARAGRAPH_WORDS words dropped, and
    everything from "See also" / "References" on cut."""
    from gensim.corpora.wikicorpus import filter_wiki

    paragraphs, heading = [], None
    for line in filter_wiki(wikitext).splitlines():
        line = line.strip()
        match = _HEADING.match(line)
        if match:
            if match.group(2).lower() in WIKI_END_SECTIONS:
                break
            heading = match.group(2)
            continue
        line = re.sub(r"'{2,}", "", line).lstrip("*#:; ")
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses emptied by removed templates
        line = re.sub(r"\s+([,.;:])", r"\1", line)
        line = re.sub(r"\s{2,}", " ", line).strip()
        if len(line.split()) < MIN_PARAGRAPH_WORDS:
            continue
        if heading:
            paragraphs.append(heading)
            heading = None
        paragraphs.append(line)
    return paragraphs


def _extract_wiki_articles() -> list[tuple[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(_gensim_test_data() / WIKI_FILE) as f:
        for title, wikitext, _pageid in extract_pages(f):
            if wikitext.lstrip().lower().startswith("#redirect"):
                continue
            paragraphs = clean_wiki_article(wikitext)
            if paragraphs:
                articles.append((title, "\n\n".join([title, *paragraphs])))
    return articles


def split_articles(articles: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Deterministic split by article: order by SHA-1 of the title, then the first
    WIKI_EVAL_FRACTION of the characters is eval, the next WIKI_CALIB_FRACTION calib,
    the rest train. An article never straddles two splits."""
    ordered = sorted(articles, key=lambda a: hashlib.sha1(a[0].encode("utf-8")).hexdigest())
    total = sum(len(text) for _, text in ordered)
    bounds = (("eval", WIKI_EVAL_FRACTION * total),
              ("calib", (WIKI_EVAL_FRACTION + WIKI_CALIB_FRACTION) * total))
    parts: dict[str, list[tuple[str, str]]] = {split: [] for split in SPLITS}
    seen = 0
    for title, text in ordered:
        split = next((name for name, bound in bounds if seen < bound), "train")
        parts[split].append((title, text))
        seen += len(text)
    return parts


def default_corpus_dir() -> Path:
    """The cached split of the embedded Wikipedia sample (extracted on first use, ~10 s)."""
    final = cache_root() / "data" / WIKI_CACHE_NAME
    if final.is_dir():
        return final
    parts = split_articles(_extract_wiki_articles())
    with atomic_directory(final) as tmp:
        for split, articles in parts.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for title, text in articles:
                    f.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
    return final


def _wiki_split(split: str) -> list[str]:
    return _local_documents(default_corpus_dir() / f"{split}.jsonl")


# ------------------------------------------------------------------------ tokens

def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """One token sequence for a whole text, LongTensor [1, T]."""
    # verbose=False: a whole corpus is longer than model_max_length, on purpose.
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids


def eval_tokens(tokenizer, dataset: str) -> torch.Tensor:
    """The eval text of `dataset` as one token sequence, LongTensor [1, T]."""
    return tokenize_text(tokenizer, load_text(dataset, "eval"))


def _too_short(what: str, have: int, need: int, dataset: str, split: str) -> DatasetError:
    return DatasetError(f"{what} of dataset {dataset!r} ({split}) has {have} tokens, "
                        f"fewer than the {need} needed")


def calibration_samples(tokenizer, dataset: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens from the calib split, LongTensor
    [nsamples, seqlen]. Wanda's sampling with Python's `random` seeded by `seed`:
    for c4 a random document longer than seqlen, then a random window in it (the
    same draws as the Wanda reference); otherwise random windows of the whole text."""
    if nsamples < 1 or seqlen < 1:
        raise DatasetError(f"nsamples and seqlen must be >= 1, got nsamples={nsamples}, seqlen={seqlen}")
    rng = random.Random(seed)
    if dataset == "c4":
        return _c4_calibration(tokenizer, load_documents("c4", "calib"), nsamples, seqlen, rng)
    ids = tokenize_text(tokenizer, load_text(dataset, "calib"))[0]
    if ids.numel() <= seqlen:
        raise _too_short("the calibration text", ids.numel(), seqlen + 1, dataset, "calib")
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def _c4_calibration(tokenizer, documents: Sequence[str], nsamples: int, seqlen: int,
                    rng: random.Random, max_draws_per_sample: int = 1000) -> torch.Tensor:
    windows = []
    for _ in range(nsamples):
        for _draw in range(max_draws_per_sample):
            ids = tokenize_text(tokenizer, documents[rng.randint(0, len(documents) - 1)])[0]
            if ids.numel() > seqlen:
                break
        else:
            raise DatasetError(f"no c4 document longer than seqlen {seqlen} tokens found in "
                               f"{max_draws_per_sample} random draws; use a smaller --seqlen")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


def train_token_blocks(tokenizer, dataset: str, block_size: int, max_samples: int | None = None,
                       tokenize_batch: int = 256) -> torch.Tensor:
    """Fine-tuning blocks, LongTensor [N, block_size], like run_clm's group_texts: each
    train document is tokenized, all are concatenated, cut into block_size blocks
    and the remainder dropped; `max_samples` keeps the first N blocks (and stops
    tokenizing once they are there)."""
    if block_size < 1 or (max_samples is not None and max_samples < 1):
        raise DatasetError(f"block_size and max_samples must be >= 1, got {block_size}, {max_samples}")
    documents = load_documents(dataset, "train")
    need = None if max_samples is None else max_samples * block_size
    pieces, have = [], 0
    for start in range(0, len(documents), tokenize_batch):
        batch = tokenizer(documents[start:start + tokenize_batch], verbose=False).input_ids
        for ids in batch:
            pieces.append(torch.tensor(ids, dtype=torch.long))
            have += len(ids)
        if need is not None and have >= need:
            break
    ids = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    blocks = ids.numel() // block_size
    if blocks == 0:
        raise _too_short("the train text", ids.numel(), block_size, dataset, "train")
    if max_samples is not None:
        blocks = min(blocks, max_samples)
    return ids[:blocks * block_size].view(blocks, block_size)
