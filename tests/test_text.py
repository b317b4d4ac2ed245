"""The ``text`` dataset, tokenizers, the evaluation protocol (against the Hugging Face perplexity
guide's loop) and the language-model task."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchkit.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from benchkit.data import DataNotFoundError, folder_identity, known_shape, load_data
from benchkit.models import build_model
from benchkit.tasks import LanguageModel, task_of
from benchkit.textdata import (
    IGNORE_INDEX,
    ByteTokenizer,
    CharTokenizer,
    SlidingWindows,
    random_windows,
    sliding_windows,
)
from benchkit.training import evaluate, train
from benchkit.validation import load_config

torch.set_num_threads(1)

WORKS = {  # file stem -> (title, text)
    "alpha": ("The Alpha Play", "ALPHA. To be or not to be.\nBETA. That is the question!\n" * 30),
    "beta": ("Beta", "Now is the winter of our discontent\nMade glorious summer.\n" * 30),
    "gamma": ("Gamma", "Friends, Romans, countrymen, lend me your ears;\n" * 30),
    "delta": ("Delta", "Double, double toil and trouble; fire burn and caldron bubble. Zq!\n" * 20),
}


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir()
    meta = []
    for stem, (title, text) in WORKS.items():
        (folder / f"{stem}.txt").write_text(text)
        meta.append(f"[{stem}]\ntitle = {title}\n")
    (tmp_path / "metadata.txt").write_text("\n".join(meta))
    return folder


def text_cfg(corpus: Path, **kw) -> DataConfig:
    return DataConfig(name="text", root=str(corpus), val_works=["Gamma"], test_works=["delta"], **kw)


def shakespeare_root() -> Path | None:
    for cand in (os.environ.get("BENCHKIT_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data",
                 "/work/shared/data"):
        if cand and (Path(cand) / "shakespeare" / "texts").is_dir():
            return Path(cand)
    return None


# --------------------------------------------------------------------------------------------- tokenizers
def test_char_tokenizer_vocabulary_comes_from_training_text():
    tok = CharTokenizer("banana!")
    assert tok.chars == ["!", "a", "b", "n"] and tok.vocab_size == 5  # + the unknown symbol, id 0
    assert tok.encode("ban!").tolist() == [3, 2, 4, 1]
    assert tok.encode("bz").tolist() == [3, 0]  # z never seen in training
    assert tok.decode(tok.encode("nab")) == "nab" and tok.decode([0]) == "\ufffd"


def test_byte_tokenizer_counts_characters_not_bytes():
    tok = ByteTokenizer()
    ids = tok.encode("né€")
    assert tok.vocab_size == 256 and ids.tolist() == list("né€".encode())
    assert len(ids) == 6 and tok.characters(ids) == 3 and tok.decode(ids) == "né€"


# --------------------------------------------------------------------------------------------- the protocol
def hf_guide_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The loop of huggingface.co/docs/transformers/perplexity (labels = inputs, shifted inside the
    model): (begin, end, trg_len) per window."""
    out, prev_end_loc = [], 0
    for begin_loc in range(0, n_tokens, stride):
        end_loc = min(begin_loc + max_length, n_tokens)
        trg_len = end_loc - prev_end_loc
        out.append((begin_loc, end_loc, trg_len))
        prev_end_loc = end_loc
        if end_loc == n_tokens:
            break
    return out


def scored(windows_: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """(target position, tokens of context) for every scored target of HF-style windows
    (the label at position p is predicted from positions begin..p-1; position begin has no prediction)."""
    out = []
    for begin, end, trg_len in windows_:
        for p in range(max(end - trg_len, begin + 1), end):
            out.append((p, p - begin))
    return out


@pytest.mark.parametrize("n, context, stride", [(10, 4, 2), (50, 8, 8), (50, 8, 3), (9, 8, 1), (3, 8, 4)])
def test_sliding_windows_score_each_token_once_as_the_hf_guide(n, context, stride):
    mine = [(w.begin, w.end + 1, w.scored) for w in sliding_windows(n, context, stride)]
    hf = scored(hf_guide_windows(n, context + 1, stride))  # HF's window holds inputs and the last target
    assert scored(mine) == hf
    assert sorted(p for p, _ in hf) == list(range(1, n))  # every token after the first, once
    if n > context + 1:  # after the first window, at least context - stride + 1 tokens of context
        assert min(c for p, c in hf if p > context) >= context - stride + 1


def test_language_model_metrics_equal_a_direct_computation():
    torch.manual_seed(0)
    vocab, context, stride = 11, 8, 3
    model = build_model(ModelConfig(name="gpt", kwargs={"n_layer": 1, "n_embd": 8, "n_head": 2}), (context,),
                        vocab).eval()
    tokens = torch.randint(0, vocab, (40,))
    loader = SlidingWindows(tokens, context, stride, batch_size=4, characters=39, split="val")
    m = evaluate(model, loader, "cpu")
    # the HF guide's loop with sums instead of its trg_len-weighted means (which are approximate)
    nats, count = 0.0, 0
    with torch.no_grad():
        for begin, end, trg_len in hf_guide_windows(len(tokens), context + 1, stride):
            ids = tokens[begin:end]
            labels = ids.clone()
            labels[:-trg_len] = IGNORE_INDEX
            logits = model(ids[:-1].unsqueeze(0))[0]
            nats += F.cross_entropy(logits.double(), labels[1:], ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels[1:] != IGNORE_INDEX).sum())
    assert count == 39 == m["tokens"]
    assert m["loss"] == pytest.approx(nats / count, rel=1e-6)
    assert m["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-6)
    assert m["bpc"] == pytest.approx(nats / count / math.log(2), rel=1e-6)
    assert (m["context"], m["stride"]) == (context, stride)
    assert loader.protocol["split"] == "val" and task_of(loader).name == "language_model"


def test_language_model_loss_skips_unscored_targets():
    logits = torch.randn(2, 3, 5)
    y = torch.tensor([[1, IGNORE_INDEX, 4], [IGNORE_INDEX, 0, 2]])
    keep = y != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], y[keep])
    assert LanguageModel().loss(logits, y, None).item() == pytest.approx(expected.item())


# --------------------------------------------------------------------------------------------- the dataset
def test_text_bundle_holds_out_whole_works(corpus):
    data = load_data(text_cfg(corpus, context=16, stride=8), batch_size=4, eval_batch_size=8)
    assert data.task == "language_model" and data.input_shape == (16,)
    works = data.meta["works"]
    assert works["val"] == ["Gamma"] and works["test"] == ["Delta"] and works["train"] == ["The Alpha Play", "Beta"]
    train_text = WORKS["alpha"][1] + WORKS["beta"][1]
    assert data.num_classes == len(set(train_text)) + 1 == data.tokenizer.vocab_size
    assert data.sizes == {"train": len(train_text), "val": len(WORKS["gamma"][1]), "test": len(WORKS["delta"][1])}
    seen = set(train_text)  # the whole work, nothing else; characters training never saw are unknown
    assert data.tokenizer.decode(data.val.tokens) == "".join(c if c in seen else "\ufffd" for c in WORKS["gamma"][1])
    assert int((data.test.tokens == 0).sum()) == sum(c not in seen for c in WORKS["delta"][1]) > 0
    x, y = next(iter(data.train))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert data.test.protocol["works"] == ["Delta"] and data.test.protocol["stride"] == 8


def test_training_windows_follow_the_run_seed(corpus):
    def batches(seed):
        data = load_data(text_cfg(corpus), batch_size=3, seed=seed)
        return [x for x, _ in data.train][:3], data

    a, data = batches(0)
    b, _ = batches(0)
    c, _ = batches(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not torch.equal(a[0], c[0])
    data.train.generator.manual_seed(0)  # what RunContext.reseed does per phase
    assert torch.equal(next(iter(data.train))[0], a[0])
    assert len(data.train) == (data.sizes["train"] - 1) // (3 * 128)  # about one pass over the tokens


def test_subsets_and_byte_tokenizer(corpus):
    data = load_data(text_cfg(corpus, tokenizer="byte", train_subset=300, eval_subset=100, context=8), 2)
    assert data.num_classes == 256 and data.sizes == {"train": 300, "val": 100, "test": 100}
    assert data.val.characters == 99 and data.meta["tokenizer"] == "byte"


def test_bad_splits_are_refused_naming_the_works(corpus):
    with pytest.raises(ConfigError, match="(?s)no work titled or named 'Hamlet'.*The Alpha Play \\(alpha\\)"):
        load_data(DataConfig(name="text", root=str(corpus), val_works=["Hamlet"], test_works=["delta"]), 2)
    with pytest.raises(ConfigError, match="share"):
        load_data(DataConfig(name="text", root=str(corpus), val_works=["Beta"], test_works=["beta"]), 2)
    with pytest.raises(ConfigError, match="needs at least 129 tokens"):
        load_data(text_cfg(corpus, train_subset=50, context=128), 2)


def test_missing_corpus_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCHKIT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="(?s)nowhere/shakespeare/texts.*BENCHKIT_DATA"):
        load_data(DataConfig(name="text"), 2)


def test_config_keys_hash_and_validation(corpus):
    # the text keys are not part of the hash of configs of other data (and refused there by validation)
    plain = ExperimentConfig.from_dict({"data": {"name": "fashion-mnist"}, "model": {"name": "lenet5"}})
    assert ExperimentConfig.from_dict({"data": {"name": "fashion-mnist", "context": 999, "tokenizer": "byte"},
                                       "model": {"name": "lenet5"}}).config_hash() == plain.config_hash()
    base = {"data": {"name": "text", "root": str(corpus)}, "model": {"name": "gpt"}}
    a = ExperimentConfig.from_dict(base)
    for key, value in (("data.tokenizer", "byte"), ("data.context", 64), ("data.stride", 16),
                       ("data.val_works", ["Beta"]), ("data.root", str(corpus.parent))):
        assert ExperimentConfig.from_dict(base, {key: value}).config_hash() != a.config_hash(), key
    with pytest.raises(ConfigError, match="data.tokenizer.*only applies to data.name 'text'"):
        load_config({"data": {"name": "digits", "tokenizer": "byte"}})
    with pytest.raises(ConfigError, match="unknown tokenizer 'bpe'; allowed: byte, char"):
        load_config(base, {"data.tokenizer": "bpe"})
    with pytest.raises(ConfigError, match="data.stride.*\\[1, data.context=8\\]"):
        load_config(base, {"data.context": 8, "data.stride": 9})
    assert known_shape(DataConfig(name="text", context=64, tokenizer="byte")) == ((64,), 256)


def test_dense_cache_identity_follows_the_corpus_contents(corpus):
    cfg = text_cfg(corpus)
    before = folder_identity(cfg)
    assert before["folder"] == str(corpus.resolve())
    (corpus / "beta.txt").write_text("changed\n" * 40)
    assert folder_identity(cfg)["folder_contents"] != before["folder_contents"]


def test_random_windows_are_segments_of_the_text():
    tokens = torch.arange(100)
    w = random_windows(tokens, 5, 10, torch.Generator().manual_seed(0))
    assert w.shape == (5, 10) and torch.equal(w - w[:, :1], torch.arange(10).expand(5, 10))


def test_a_tiny_gpt_learns_a_slice_of_shakespeare():
    root = shakespeare_root()
    if root is None:
        pytest.skip("the Shakespeare corpus is not in ../shared/data or $BENCHKIT_DATA")
    cfg = DataConfig(name="text", root=str(root / "shakespeare" / "texts"), train_subset=20_000, eval_subset=2_000,
                     context=32)
    data = load_data(cfg, batch_size=16, eval_batch_size=64, seed=0)
    assert data.meta["works"]["val"] == ["Julius Caesar"] and data.meta["works"]["test"] == ["Macbeth"]
    assert len(data.meta["works"]["train"]) == 40
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="gpt", kwargs={"n_layer": 1, "n_embd": 32, "n_head": 4}), data)
    before = evaluate(model, data.val, "cpu")
    assert before["loss"] == pytest.approx(math.log(data.num_classes), abs=0.1)  # near-uniform at init
    history = train(model, data, TrainConfig(optimizer="adamw", lr=3e-3, iterations=40, eval_every=40), device="cpu")
    after = history.records[-1]
    assert after["val_loss"] < before["loss"] - 0.8  # character frequencies alone are worth more than that
    assert evaluate(model, data.test, "cpu")["bpc"] < before["bpc"]
