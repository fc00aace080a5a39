"""Sentence pairs, vocabularies and fixed-shape batches for the seq2seq example.

Two sources of pairs:

* Generated (default, offline, deterministic): an integer ``n`` becomes the pair
  ``num2words(n, lang="en") -> num2words(n, lang="fr")``. Train and test numbers are drawn
  without replacement from one shuffled range, so the two sets never share a number.
  Tokens are words split on white space with punctuation (the English thousands comma) as
  tokens of their own. Hyphenated compounds ("ninety-seven", "quatre-vingt-dix-sept") stay
  one token: both languages build them from a closed set, so this keeps the vocabularies
  small (about a hundred words each) and the sequences short, which is what makes the
  default run fast on a CPU.
* ``--data FILE``: tab-separated pairs in the layout of the ``eng-fra.txt`` file used by the
  PyTorch seq2seq tutorial. Text is lower-cased, accents are stripped, ``.!?`` become
  separate tokens and every other non-letter becomes a space; pairs can be filtered by
  length and by an English prefix. Test pairs are held out by source sentence.

Every array has a fixed shape (``max_source_length``/``max_target_length`` of the data set),
so the jitted train step compiles once.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")

# Sentence openings kept by --prefix-filter, written as they look after normalisation
# (apostrophes have become spaces: "i'm" -> "i m").
ENGLISH_PREFIXES = (
    "i am ",
    "i m ",
    "he is ",
    "he s ",
    "she is ",
    "she s ",
    "you are ",
    "you re ",
    "we are ",
    "we re ",
    "they are ",
    "they re ",
)


class DataError(ValueError):
    """The data file cannot be used: missing, unreadable, empty or with no usable pair."""


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token <-> id mapping; ids 0-3 are PAD, BOS, EOS and UNK."""

    tokens: tuple[str, ...]

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]]) -> Vocab:
        """Vocabulary of every token seen, most frequent first (ties alphabetically)."""
        counts = Counter(token for sentence in sentences for token in sentence)
        ordered = sorted(counts, key=lambda token: (-counts[token], token))
        return cls(SPECIAL_TOKENS + tuple(ordered))

    @property
    def index(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, sentences: Sequence[Sequence[str]], length: int) -> np.ndarray:
        """``(len(sentences), length)`` int32 ids, each sentence followed by EOS then PAD."""
        index = self.index
        ids = np.full((len(sentences), length), PAD, dtype=np.int32)
        for row, sentence in enumerate(sentences):
            encoded = [index.get(token, UNK) for token in sentence] + [EOS]
            if len(encoded) > length:
                raise ValueError(f"sentence of {len(sentence)} tokens does not fit {length}")
            ids[row, : len(encoded)] = encoded
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens up to the first EOS (or PAD), joined by spaces."""
        words = []
        for token_id in ids:
            if token_id in (EOS, PAD):
                break
            words.append(self.tokens[int(token_id)])
        return " ".join(words)


@dataclasses.dataclass(frozen=True)
class SplitArrays:
    """One split as arrays: ``source``/``target`` ids, plus the original text for samples."""

    source: np.ndarray
    target: np.ndarray
    source_text: tuple[str, ...]
    target_text: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.source.shape[0])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test splits sharing vocabularies and fixed sequence lengths."""

    train: SplitArrays
    test: SplitArrays
    source_vocab: Vocab
    target_vocab: Vocab
    # Facts worth reporting, e.g. how many malformed lines a TSV file had.
    info: dict[str, object]

    @property
    def max_target_length(self) -> int:
        return int(self.train.target.shape[1])


# --- generated number words ----------------------------------------------------------------


def tokenize_number_words(text: str) -> list[str]:
    """Words (hyphenated compounds kept whole) and punctuation marks as separate tokens."""
    return re.findall(r"[\w'-]+|[^\w\s]", text)


def sample_numbers(
    number_min: int, number_max: int, train_size: int, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train and test numbers drawn without replacement from ``[min, max]``."""
    population = number_max - number_min + 1
    if train_size + test_size > population:
        raise ValueError(
            f"train_size + test_size = {train_size + test_size} exceeds the "
            f"{population} numbers in [{number_min}, {number_max}]"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(population, size=train_size + test_size, replace=False) + number_min
    return chosen[:train_size], chosen[train_size:]


def number_pairs(numbers: Iterable[int]) -> list[tuple[str, str]]:
    """(English words, French words) for each number, straight from num2words."""
    from num2words import num2words  # imported here: only the generated task needs it

    return [(num2words(int(n), lang="en"), num2words(int(n), lang="fr")) for n in numbers]


# --- tab-separated sentence pairs ------------------------------------------------------------


def strip_accents(text: str) -> str:
    """Drop combining marks after canonical decomposition: "été" -> "ete"."""
    decomposed = unicodedata.normalize("NFD", text)
    return "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")


def normalize_sentence(text: str) -> str:
    """Lower case, no accents, ``.!?`` split off, anything else but letters a-z -> space."""
    text = strip_accents(text.lower().strip())
    text = re.sub(r"([.!?])", r" \1 ", text)
    text = re.sub(r"[^a-z.!?]+", " ", text)
    return " ".join(text.split())


def read_tsv_pairs(
    path: str | Path, max_length: int, prefix_filter: bool, reverse: bool
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Normalised (source, target) pairs from a TSV file, and counts of what was dropped.

    A line is malformed when it is not valid UTF-8, has no tab, or a side is empty after
    normalisation; it is skipped and counted. The filters count separately. Raises
    :class:`DataError` if the file cannot be read, is empty, or leaves no pair.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error}") from error
    if not raw.strip():
        raise DataError(f"data file {path} is empty")

    pairs: list[tuple[str, str]] = []
    counts = {"lines": 0, "malformed": 0, "too_long": 0, "prefix_filtered": 0}
    for raw_line in raw.splitlines():
        if not raw_line.strip():
            continue
        counts["lines"] += 1
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            counts["malformed"] += 1
            continue
        columns = line.split("\t")
        if len(columns) < 2:
            counts["malformed"] += 1
            continue
        english, other = normalize_sentence(columns[0]), normalize_sentence(columns[1])
        if not english or not other:
            counts["malformed"] += 1
            continue
        if prefix_filter and not (english + " ").startswith(ENGLISH_PREFIXES):
            counts["prefix_filtered"] += 1
            continue
        if max(len(english.split()), len(other.split())) >= max_length:
            counts["too_long"] += 1
            continue
        pairs.append((other, english) if reverse else (english, other))
    if not pairs:
        raise DataError(f"no usable sentence pair in {path} ({counts})")
    return pairs, counts


def split_by_source(
    pairs: Sequence[tuple[str, str]], test_size: int, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Hold out every pair of ``test_size`` randomly chosen source sentences (at most 20%)."""
    sources = sorted({source for source, _ in pairs})
    if len(sources) < 2:
        raise DataError("need at least two distinct source sentences to hold out a test set")
    held_out_count = max(1, min(test_size, len(sources) // 5))
    order = np.random.default_rng(seed).permutation(len(sources))
    held_out = {sources[i] for i in order[:held_out_count]}
    train = [pair for pair in pairs if pair[0] not in held_out]
    test = [pair for pair in pairs if pair[0] in held_out]
    return train, test


# --- assembling the data set -----------------------------------------------------------------


def build_dataset(
    train_pairs: Sequence[tuple[str, str]],
    test_pairs: Sequence[tuple[str, str]],
    tokenize,
    info: dict[str, object],
) -> Dataset:
    """Tokenise, build vocabularies on the training side only, and pad to fixed lengths."""
    train_tokens = [(tokenize(s), tokenize(t)) for s, t in train_pairs]
    test_tokens = [(tokenize(s), tokenize(t)) for s, t in test_pairs]
    source_vocab = Vocab.build(source for source, _ in train_tokens)
    target_vocab = Vocab.build(target for _, target in train_tokens)
    every = train_tokens + test_tokens
    source_length = 1 + max(len(source) for source, _ in every)  # +1 for EOS
    target_length = 1 + max(len(target) for _, target in every)

    def arrays(tokens, pairs) -> SplitArrays:
        return SplitArrays(
            source=source_vocab.encode([s for s, _ in tokens], source_length),
            target=target_vocab.encode([t for _, t in tokens], target_length),
            source_text=tuple(s for s, _ in pairs),
            target_text=tuple(t for _, t in pairs),
        )

    info = {
        **info,
        "train_pairs": len(train_pairs),
        "test_pairs": len(test_pairs),
        "source_vocab": len(source_vocab),
        "target_vocab": len(target_vocab),
        "source_length": source_length,
        "target_length": target_length,
    }
    return Dataset(
        arrays(train_tokens, train_pairs),
        arrays(test_tokens, test_pairs),
        source_vocab,
        target_vocab,
        info,
    )


def load_dataset(config) -> Dataset:
    """The data set a :class:`~examples.seq2seq.config.Config` asks for."""
    if config.data is None:
        train_numbers, test_numbers = sample_numbers(
            config.number_min,
            config.number_max,
            config.train_size,
            config.test_size,
            config.data_seed,
        )
        info: dict[str, object] = {"source": "num2words en->fr"}
        return build_dataset(
            number_pairs(train_numbers), number_pairs(test_numbers), tokenize_number_words, info
        )
    pairs, counts = read_tsv_pairs(
        config.data, config.max_length, config.prefix_filter, config.reverse
    )
    train, test = split_by_source(pairs, config.test_size, config.data_seed)
    return build_dataset(train, test, str.split, {"source": str(config.data), **counts})


# --- batches ---------------------------------------------------------------------------------


def decoder_inputs(target: np.ndarray) -> np.ndarray:
    """Teacher forcing: the decoder reads BOS then the target shifted right by one."""
    bos = np.full((target.shape[0], 1), BOS, dtype=target.dtype)
    return np.concatenate([bos, target[:, :-1]], axis=1)


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training pairs in one epoch; a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def train_batch(split: SplitArrays, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """The batch of training step ``step``, computed from the step alone.

    Pairs are visited in a fresh random order each epoch; a batch that crosses an epoch
    boundary takes the rest of one epoch and the start of the next. Because nothing but
    ``(seed, step)`` decides the batch, resuming from a checkpoint needs only the step.
    """
    size = len(split)
    positions = step * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, size)
    indices = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        indices[in_epoch] = epoch_permutation(size, seed, int(epoch))[offsets[in_epoch]]
    return {
        "source": split.source[indices],
        "decoder_input": decoder_inputs(split.target[indices]),
        "target": split.target[indices],
    }


def eval_batches(split: SplitArrays, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The whole split in batches of exactly ``batch_size``; the last one padded with PAD."""
    batches = []
    for start in range(0, len(split), batch_size):
        source = split.source[start : start + batch_size]
        target = split.target[start : start + batch_size]
        missing = batch_size - source.shape[0]
        if missing:
            source = np.pad(source, ((0, missing), (0, 0)), constant_values=PAD)
            target = np.pad(target, ((0, missing), (0, 0)), constant_values=PAD)
        batches.append({"source": source, "target": target, "count": batch_size - missing})
    return batches
