"""Text for language models: a corpus of works (one ``.txt`` file each), tokenizers, and the two ways a
language model reads a token stream — random training windows and the sliding-window evaluation.

**Splits are whole works.** Validation and test are held-out works named by title (or file name),
never random lines, so no passage of a held-out work is ever seen in training.

**Tokenizers** (``data.tokenizer``, part of the config and its hash): ``char`` — one token per
character, the vocabulary being the characters of the *training* works (sorted) after an unknown
symbol at id 0 that stands for any character the training works lack; ``byte`` — the 256 byte
values of the UTF-8 encoding.

**Evaluation protocol** (:class:`SlidingWindows`, as the Hugging Face perplexity guide): windows of
at most ``context`` tokens start every ``stride`` tokens; each window scores only the targets the
previous window did not, so every token after the first is scored exactly once, with as much left
context as its window gives (at least ``context - stride + 1`` tokens after the first window). The
loss is the mean over those tokens (nats/token); perplexity is its exponential; bits per character
divide the summed loss in bits by the number of characters scored (equal to the tokens for
``char``; for ``byte``, the characters whose first byte is scored).
"""

from __future__ import annotations

import configparser
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from benchkit.registry import Registry

IGNORE_INDEX = -100  # targets a window does not score (F.cross_entropy's default ignore_index)
UNKNOWN = "\ufffd"  # how the char tokenizer decodes its unknown symbol


class TextError(ValueError):
    """A text corpus or split that cannot be used as asked; the message names the fix."""


# --------------------------------------------------------------------------------------------- tokenizers
class Tokenizer:
    """``encode(str) -> LongTensor`` and ``decode(ids) -> str``; ``vocab_size`` ids in ``[0, vocab_size)``."""

    name: str = ""
    vocab_size: int = 0

    def encode(self, text: str) -> Tensor:
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        raise NotImplementedError

    def characters(self, ids: Tensor) -> int:
        """How many characters the tokens ``ids`` hold (each counted where its first token is)."""
        return int(ids.numel())


class CharTokenizer(Tokenizer):
    """Characters of the training text, sorted, after the unknown symbol (id 0)."""

    name = "char"

    def __init__(self, training_text: str):
        self.chars = sorted(set(training_text))
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str) -> Tensor:
        index = self.index
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.chars[i - 1] if i > 0 else UNKNOWN for i in ids)


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text: 256 ids, nothing unknown."""

    name = "byte"
    vocab_size = 256

    def __init__(self, training_text: str = ""):
        pass

    def encode(self, text: str) -> Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return bytes(ids).decode("utf-8", errors="replace")

    def characters(self, ids: Tensor) -> int:
        return int(((ids & 0xC0) != 0x80).sum())  # UTF-8 continuation bytes start no character


TOKENIZERS: Registry[type[Tokenizer]] = Registry("tokenizer")
TOKENIZERS.register("char", CharTokenizer)
TOKENIZERS.register("byte", ByteTokenizer)


# --------------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class Work:
    """One ``.txt`` file of a corpus: its title (from ``metadata.txt`` when there is one) and path."""

    title: str
    path: Path

    @property
    def key(self) -> str:
        return self.path.stem


def read_titles(folder: Path) -> dict[str, str]:
    """``{file stem: title}`` from a ``metadata.txt`` beside or above ``folder`` (the layout of the
    Shakespeare corpus: ``[hamlet_gut]`` sections with ``title = Hamlet``); empty when there is none."""
    for candidate in (folder / "metadata.txt", folder.parent / "metadata.txt"):
        if candidate.is_file():
            parser = configparser.RawConfigParser()
            parser.read(candidate, encoding="utf-8")
            return {s: parser.get(s, "title") for s in parser.sections() if parser.has_option(s, "title")}
    return {}


def list_works(folder: Path) -> list[Work]:
    """Every ``*.txt`` file in ``folder``, sorted by file name."""
    titles = read_titles(folder)
    return [Work(titles.get(p.stem, p.stem), p) for p in sorted(folder.glob("*.txt")) if p.is_file()]


def select_works(works: Sequence[Work], names: Sequence[str], key: str) -> list[Work]:
    """The works named by title or file name (case-insensitive), in the order given."""
    out = []
    for name in names:
        wanted = str(name).strip().lower()
        hit = [w for w in works if wanted in (w.title.lower(), w.key.lower())]
        if not hit:
            listing = "; ".join(f"{w.title} ({w.key})" for w in works)
            raise TextError(f"{key}: no work titled or named {name!r} in the corpus; works: {listing}")
        if len(hit) > 1:
            raise TextError(f"{key}: {name!r} names several works ({', '.join(w.key for w in hit)}); "
                            "use the file name")
        if hit[0] not in out:
            out.append(hit[0])
    return out


def read_text(works: Sequence[Work]) -> str:
    """The works' texts concatenated (UTF-8; Windows line ends normalised), each ending with a newline."""
    parts = []
    for w in works:
        text = w.path.read_text(encoding="utf-8").replace("\r\n", "\n")
        parts.append(text if text.endswith("\n") else text + "\n")
    return "".join(parts)


def folder_digest(folder: Path) -> str:
    """sha256 over every ``.txt`` file's name and contents (and ``metadata.txt``): the corpus itself,
    for the dense-model cache (a few MB read once)."""
    h = hashlib.sha256()
    files = sorted(folder.glob("*.txt"))
    meta = [p for p in (folder / "metadata.txt", folder.parent / "metadata.txt") if p.is_file()][:1]
    for p in [*files, *meta]:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- loaders
def window_starts(n_tokens: int, context: int, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` random window starts in ``[0, n_tokens - context - 1]``: room for ``context`` inputs
    and their next-token targets."""
    if n_tokens < context + 1:
        raise TextError(f"a window of {context} tokens needs at least {context + 1} tokens of text, got {n_tokens}; "
                        "lower data.context or use more text")
    return torch.randint(0, n_tokens - context, (count,), generator=generator)


def windows_at(tokens: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Inputs ``tokens[s : s+context]`` and targets ``tokens[s+1 : s+context+1]`` for each start."""
    chunk = tokens[starts[:, None] + torch.arange(context + 1)]
    return chunk[:, :-1], chunk[:, 1:]


def random_windows(tokens: Tensor, count: int, context: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` random windows of ``context`` tokens ``[count, context]`` (e.g. calibration inputs,
    drawn as Wanda and SparseGPT draw theirs: random segments of the training text)."""
    starts = window_starts(len(tokens), context, count, generator)
    return tokens[starts[:, None] + torch.arange(context)]


class Windows(Dataset):
    """Consecutive, non-overlapping ``(inputs, targets)`` windows of a token stream (map-style, for code
    that wants a Dataset of examples, e.g. scoring batches drawn by a DataLoader)."""

    def __init__(self, tokens: Tensor, context: int):
        self.tokens, self.context = tokens, context

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.context)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = i * self.context
        return self.tokens[s:s + self.context], self.tokens[s + 1:s + self.context + 1]


class RandomWindows:
    """Training batches: ``batch_size`` windows of ``context`` tokens at random starts, drawn from
    ``generator`` when the batch is requested (the run seeds it, so the data order is part of the
    seed). An epoch is ``batches_per_epoch`` batches (default: about one pass over the tokens)."""

    task = "language_model"

    def __init__(self, tokens: Tensor, context: int, batch_size: int, generator: torch.Generator | None = None,
                 batches_per_epoch: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        window_starts(len(tokens), context, 0, None)  # enough text for one window
        self.tokens, self.context, self.batch_size, self.generator = tokens, context, batch_size, generator
        self.batches_per_epoch = batches_per_epoch or max(1, (len(tokens) - 1) // (batch_size * context))
        self.dataset = Windows(tokens, context)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(self.batches_per_epoch):
            starts = window_starts(len(self.tokens), self.context, self.batch_size, self.generator)
            yield windows_at(self.tokens, starts, self.context)


@dataclass(frozen=True)
class Window:
    begin: int  # inputs tokens[begin:end], targets tokens[begin+1:end+1]
    end: int
    scored: int  # the last `scored` targets are new; the others were scored by an earlier window


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The evaluation windows over ``n_tokens`` tokens: targets are positions 1..n-1, each scored once."""
    if not 1 <= stride <= context:
        raise TextError(f"the evaluation stride must be in [1, context={context}], got {stride}")
    if n_tokens < 2:
        raise TextError(f"evaluation needs at least 2 tokens of text, got {n_tokens}")
    windows, done, begin = [], 0, 0
    while done < n_tokens - 1:
        end = min(begin + context, n_tokens - 1)
        windows.append(Window(begin, end, end - done))
        done, begin = end, begin + stride
    return windows


class SlidingWindows:
    """Evaluation batches ``(inputs [B, L], targets [B, L])`` over one split, targets already scored
    by an earlier window set to :data:`IGNORE_INDEX`. ``protocol`` records how (split, works,
    context, stride, tokenizer, tokens and characters scored) so runs log it beside the numbers."""

    task = "language_model"

    def __init__(self, tokens: Tensor, context: int, stride: int, batch_size: int, *, characters: int,
                 split: str = "", works: Sequence[str] = (), tokenizer: str = ""):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tokens, self.context, self.stride, self.batch_size = tokens, context, stride, batch_size
        self.windows = sliding_windows(len(tokens), context, stride)
        self.characters = characters
        self.protocol = {"split": split, "works": list(works), "context": context, "stride": stride,
                         "tokenizer": tokenizer, "tokens": len(tokens) - 1, "characters": characters}

    def _batches(self) -> list[list[Window]]:
        batches: list[list[Window]] = []
        for w in self.windows:  # windows of one length share a batch (only the last can be shorter)
            if batches and len(batches[-1]) < self.batch_size and \
                    batches[-1][0].end - batches[-1][0].begin == w.end - w.begin:
                batches[-1].append(w)
            else:
                batches.append([w])
        return batches

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self._batches():
            length = batch[0].end - batch[0].begin
            starts = torch.tensor([w.begin for w in batch])
            x, y = windows_at(self.tokens, starts, length)
            y = y.clone()
            for row, w in enumerate(batch):
                y[row, :length - w.scored] = IGNORE_INDEX
            yield x, y


def external_tokens(folder: str | Path, bundle: object) -> Tensor:
    """The .txt files of ``folder`` as one token stream in the run's tokenizer (``bundle.tokenizer``): a
    calibration source other than the training text (Wanda and SparseGPT calibrate on C4, not on the text
    they are evaluated on)."""
    path = Path(folder).expanduser()
    works = list_works(path) if path.is_dir() else []
    if not works:
        raise TextError(f"prune.calibration.source: {str(path)!r} is not a folder of .txt files; give one, or 'train'")
    tokenizer = getattr(bundle, "tokenizer", None)
    if tokenizer is None:
        raise TextError("prune.calibration.source: a folder of text needs text data (data.name: text)")
    return tokenizer.encode(read_text(works))
