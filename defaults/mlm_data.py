"""The demo MLM's data: documents read by the project's corpus reader, cut into token windows, masked, and
wrapped as MARIA feeds the MLM (defaults/pretrain_mlm.py trains on it; bench/quality.py scores with it)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from maria.backbones import ar_start_token, special_wrap
from maria_defaults.corpus_wiki import prepare_wiki_corpus
from maria_defaults.defaults import default_cache_dir
from maria_extract.corpus import cut_windows, iter_documents

MASK_TOKEN = "<|mask|>"
OBJECTIVES = {"mntp": -1, "mlm": 0}  # objective -> where the MLM predicts x[i] (its prediction_offset)


def _read_documents(path: str) -> list[str]:
    """Documents of a corpus, read by the project's one corpus reader (extract/corpus.py): the same
    formats, the same rules (a .txt file is one document) and the same one-line errors as `maria extract`."""
    return list(iter_documents(path))


def load_corpora(cfg) -> tuple[list[str], list[str]]:
    """(train documents, held-out documents), split by document and deterministic in cfg.seed."""
    if cfg.corpus == "wiki":
        train, val = prepare_wiki_corpus(default_cache_dir() / "wiki")  # the demo's split (seed 0), whatever cfg.seed
        return _read_documents(str(train))[cfg.skip_docs :], _read_documents(str(cfg.val_corpus or val))
    docs = _read_documents(cfg.corpus)
    if cfg.val_corpus:
        return docs[cfg.skip_docs :], _read_documents(cfg.val_corpus)
    docs = docs[cfg.skip_docs :]
    if not docs:
        return [], []  # load_data names the problem
    if len(docs) < 2:  # a single document: hold out its tail
        cut = int(len(docs[0]) * (1 - cfg.val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    n_val = max(1, round(cfg.val_fraction * len(docs)))
    return [docs[i] for i in sorted(order[n_val:])], [docs[i] for i in sorted(order[:n_val])]


def pack_windows(docs: list[str], tokenizer, seq_len: int, pad_id: int) -> torch.Tensor:
    """(N, seq_len) token windows cut as extraction cuts them (extract.corpus.cut_windows: never two
    documents in one window); a short last piece is right-padded with pad_id."""
    windows = [
        w + [pad_id] * (seq_len - len(w)) for ids in (tokenizer(docs, add_special_tokens=False).input_ids if docs else []) for w in cut_windows(ids, seq_len)
    ]
    if not windows:
        raise ValueError("the corpus produced no token windows; is it empty?")
    return torch.tensor(windows, dtype=torch.long)


def mask_batch(windows: torch.Tensor, attn: torch.Tensor, prob: float, mask_id: int, gen: torch.Generator, prob_low: float | None = None):
    """Replace a random `prob` of real tokens by the mask token (at least one per window); labels -100 elsewhere.
    With prob_low, each window draws its own rate from U(prob_low, prob).

    Always the mask token, never BERT's 80/10/10: MARIA only ever shows the MLM mask tokens."""
    rate = torch.full((len(windows), 1), prob)
    if prob_low is not None:
        rate = prob_low + (prob - prob_low) * torch.rand(len(windows), 1, generator=gen)
    masked = (torch.rand(windows.shape, generator=gen) < rate) & attn.bool()
    first = torch.zeros_like(masked)
    first[:, 0] = True
    masked |= first & ~masked.any(1, keepdim=True)  # never a window with nothing to predict
    inputs = windows.masked_fill(masked, mask_id)
    labels = windows.masked_fill(~masked, -100)
    return inputs, labels


def wrap_batch(inputs: torch.Tensor, labels: torch.Tensor, attn: torch.Tensor, data: MLMData):
    """(input ids, attention mask, labels) of what the MLM reads, as MARIA feeds it (maria/features.py
    mlm_inputs): its prefix, the window, its suffix after each window's last token; the label of
    x[i] sits where the MLM predicts it, position i + offset of the window (i - 1 for mntp)."""
    B, T = inputs.shape
    P, S = len(data.prefix), len(data.suffix)
    n = attn.sum(1)
    x = torch.full((B, P + T + S), data.pad_id, dtype=torch.long)
    x[:, :P] = torch.tensor(data.prefix, dtype=torch.long)
    x[:, P : P + T] = inputs
    for s, tok in enumerate(data.suffix):
        x[torch.arange(B), P + n + s] = tok
    y = torch.full_like(x, -100)
    y[:, P + data.offset : P + data.offset + T] = labels
    return x, (torch.arange(P + T + S)[None, :] < (P + n + S)[:, None]).long(), y


def masked_batch(x: torch.Tensor, data: MLMData, prob: float, gen: torch.Generator, prob_low: float | None = None):
    """Mask a batch of windows and wrap it for the model: (input ids, attention mask, labels)."""
    attn = (x != data.pad_id).long()
    inputs, labels = mask_batch(x, attn, prob, data.mask_id, gen, prob_low)
    return wrap_batch(inputs, labels, attn, data)


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class MLMData:
    """Token windows of the training and held-out documents, and the ids training needs."""

    tokenizer: object
    train: torch.Tensor  # (N, seq_len) training windows
    val: torch.Tensor  # (eval_windows, seq_len) held-out windows, a fixed sample
    pad_id: int
    mask_id: int
    train_tokens: int  # real (non-pad) tokens in one epoch
    prefix: list[int]  # what the MLM reads before each window (as MARIA feeds it): the tokenizer's specials, for mntp the start token
    suffix: list[int]  # ... and after it
    offset: int  # where x[i] is predicted: window position i + offset (OBJECTIVES)


def load_data(cfg) -> MLMData:
    """cfg: a PretrainMLMConfig (defaults/pretrain_mlm.py, which imports this file)."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_from)
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.pad_token is None:  # padding only fills a document's last window; any special token will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.mask_token
    train_docs, val_docs = load_corpora(cfg)
    for name, docs in (("training", train_docs), ("held-out", val_docs)):
        if not docs:
            raise ValueError(
                f"the {name} documents of {cfg.corpus if name == 'training' else cfg.val_corpus or cfg.corpus} are empty "
                f"(--skip-docs {cfg.skip_docs}); pass a corpus with more documents"
            )
    pad_id = tokenizer.pad_token_id
    train = pack_windows(train_docs, tokenizer, cfg.seq_len, pad_id)
    val = pack_windows(val_docs, tokenizer, cfg.seq_len, pad_id)
    val = val[torch.randperm(len(val), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.eval_windows]]
    prefix, suffix = special_wrap(tokenizer)
    offset = OBJECTIVES[cfg.objective]
    if offset and not prefix:  # the MLM predicts x[0] at the token before it: the one the AR reads first (backbones.mntp_prefix)
        if ar_start_token(tokenizer) is None:
            raise ValueError(
                f"--objective mntp predicts token 0 at the token before it, but the tokenizer of {cfg.tokenizer_from} "
                "has neither BOS nor EOS; use --objective mlm"
            )
        prefix = [ar_start_token(tokenizer)]
    data = MLMData(tokenizer, train, val, pad_id, tokenizer.mask_token_id, int((train != pad_id).sum()), prefix, suffix, offset)
    print(
        f"MLM corpus: {len(train_docs)} train docs ({data.train_tokens:,} tokens, {len(train)} windows), "
        f"{len(val_docs)} held-out docs ({len(val)} windows evaluated)"
    )
    return data
