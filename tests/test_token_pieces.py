"""A user's own chunking of the tokens (litgpt's `chunked_cross_entropy`: the logits and
labels split into pieces, the per-token losses of each piece concatenated) is computed as
one, and the loss region then cut by mst's own chunks. Checked against eager on the loss and
every gradient; refusals leave the pieces as they are, numbers unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import check_against_eager, summary
from torch import nn

VOCAB, HIDDEN = 300, 32


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, piece: int,
                          how: str) -> torch.Tensor:
    """The loss of litgpt's `chunked_cross_entropy` (lm_head not chunked), in its shape:
    flattened logits and labels split into `piece`-row pieces ("split") or sliced ("slice"),
    each piece's per-token losses concatenated, summed and divided by the kept labels."""
    logits = logits.reshape(-1, logits.size(-1))
    targets = targets.reshape(-1)
    if how == "split":
        pairs = zip(logits.split(piece), targets.split(piece))
    else:
        pairs = ((logits[i:i + piece], targets[i:i + piece])
                 for i in range(0, logits.shape[0], piece))
    losses = [F.cross_entropy(l, t, ignore_index=-100, reduction="none") for l, t in pairs]
    kept = (targets != -100).sum()
    return torch.cat(losses).sum() / kept.maximum(torch.ones_like(kept))


class PiecesLM(nn.Module):
    """Embedding, one MLP, a vocabulary head and the pieces loss. `chain`: what each piece
    runs: "ce" (the cross entropy), "cumsum" (a running sum over each piece's tokens: mixes
    tokens, must be refused), "piece_sum" (each piece's losses summed: a reduction)."""

    def __init__(self, piece: int = 64, how: str = "split", chain: str = "ce"):
        super().__init__()
        self.piece, self.how, self.chain = piece, how, chain
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, 4 * HIDDEN, bias=False)
        self.down = nn.Linear(4 * HIDDEN, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.down(F.gelu(self.up(x)))
        logits = self.head(x)
        if labels is None:
            return logits
        if self.chain == "ce":
            return chunked_cross_entropy(logits, labels, self.piece, self.how)
        flat = logits.reshape(-1, VOCAB).log_softmax(-1)
        pieces = flat.split(self.piece)
        if self.chain == "cumsum":
            return torch.cat([p.cumsum(0) for p in pieces]).mean()
        return torch.cat([p.sum(0, keepdim=True) for p in pieces]).mean()


def _model(**kwargs) -> PiecesLM:
    torch.manual_seed(0)
    return PiecesLM(**kwargs)


@pytest.mark.parametrize("how", ["split", "slice"])
@pytest.mark.parametrize("seq", [150, 128], ids=["last-shorter", "equal"])
def test_pieces_loss_is_one_loss_region(how, seq):
    """2 x 150 tokens in 64-row pieces (the last one shorter), or 2 x 128 in 4 pieces of equal
    length (litgpt at any multiple of its chunk size: the zeros each piece's backward scatters
    into then have one shape in every piece, and are per piece, not a constant), 3 chunks of
    mst's own."""
    report = check_against_eager(_model(how=how), vocab=VOCAB, batch=2, seq=seq, chunks=3,
                                 options={"strict": True, "min_bytes": 0, "chunks": 3,
                                          "compiler": "eager"})
    assert report.count("loss", "training") == 1 and report.count("mlp") == 1, summary(report)
    (graph,) = report.graphs
    pieces = -(-2 * seq // 64)
    assert len(graph.rewrites) == 2 and f"{pieces} pieces of the tokens" in graph.rewrites[0], (
        graph.rewrites)


def test_pieces_of_a_symbolic_length_are_one_loss_region():
    """dynamic=True: the piece length (an int the model passes, as litgpt's `chunk_size`) is a
    symbol, and Dynamo reads the last piece's length and leaves it unused: the split must go
    with the pieces, or the head's logits flow into it and the loss is no region."""

    class PieceArgument(PiecesLM):
        def forward(self, ids, labels, piece=64):
            x = self.emb(ids)
            logits = self.head(x + self.down(F.gelu(self.up(x))))
            return chunked_cross_entropy(logits, labels, piece, "split")

    torch.manual_seed(0)
    report = check_against_eager(PieceArgument(), vocab=VOCAB, batch=2, seq=150, chunks=3,
                                 dynamic=True, options={"strict": True, "min_bytes": 0,
                                                        "chunks": 3, "compiler": "eager"})
    assert report.count("loss", "training") == 1, summary(report)


def test_pieces_loss_through_inductor_two_micro_batches():
    report = check_against_eager(_model(piece=40), vocab=VOCAB, batch=2, seq=77, chunks=4,
                                 micro_batches=2)
    assert report.count("loss", "training") == 1, summary(report)


def test_pieces_loss_inference():
    report = check_against_eager(_model(), vocab=VOCAB, batch=2, seq=100, chunks=3,
                                 training=False, labels=True,
                                 options={"strict": True, "min_bytes": 0, "chunks": 3,
                                          "compiler": "eager"})
    assert report.count("loss", "inference") == 1 and report.graphs[0].rewrites, summary(report)


@pytest.mark.parametrize("chain", ["cumsum", "piece_sum"])
def test_pieces_that_are_not_token_wise_stay_pieces(chain):
    """A running sum over a piece's tokens, or a piece's tokens summed, is not the same
    computed on the whole: the pieces stay, the head is left whole (with its reason)."""
    report = check_against_eager(_model(chain=chain), vocab=VOCAB, batch=2, seq=100,
                                 options={"strict": False, "min_bytes": 0, "chunks": 3,
                                          "compiler": "eager"})
    assert not report.graphs[0].rewrites and report.count("loss") == 0, summary(report)
