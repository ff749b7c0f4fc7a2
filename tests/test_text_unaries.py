"""The chunking unary network (dsp.nn.text.WordTagger) alone and inside a chain CRF."""
from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from dsp.build import build_data, build_model
from dsp.cli.common import config_dir
from dsp.data.conll import load_conll2000
from dsp.errors import DspError
from dsp.models.chain_crf import ChainCRF
from dsp.nn.text import WordTagger
from dsp.objectives.chain import MarginalCrossEntropy
from fixtures_text import write_conll

SMALL = dict(word_dim=8, pos_dim=4, char_dim=4, char_hidden=6, hidden=12, dropout=0.0)


def random_batch(seed=0, b=4, t=7, c=5, num_words=30, num_pos=6, num_chars=12):
    """x [B, T, 2 + C] with padded tokens all zero and words of 1..C characters."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 1, 5])[:b]
    x = torch.zeros(b, t, 2 + c, dtype=torch.int64)
    x[..., 0] = torch.randint(1, num_words, (b, t), generator=g)
    x[..., 1] = torch.randint(1, num_pos, (b, t), generator=g)
    n_chars = torch.randint(1, c + 1, (b, t), generator=g)
    x[..., 2:] = torch.randint(1, num_chars, (b, t, c), generator=g) * (torch.arange(c) < n_chars[..., None])
    x[torch.arange(t) >= lengths[:, None]] = 0
    return x, lengths


def tagger(head, seed=0, **kwargs):
    torch.manual_seed(seed)
    return WordTagger(5, 30, 6, 12, head=head, **{**SMALL, **kwargs}).eval()


@pytest.mark.parametrize("head", ["linear", "bilstm"])
def test_shapes_and_zero_padding(head):
    x, lengths = random_batch()
    out = tagger(head)(x, lengths)
    assert out.shape == (4, 7, 5)
    pad = torch.arange(7) >= lengths[:, None]
    assert (out[pad] == 0).all() and (out[~pad] != 0).any()


@pytest.mark.parametrize("head", ["linear", "bilstm"])
def test_a_sentence_scores_the_same_whatever_its_batch_and_padding(head):
    net = tagger(head)
    x, lengths = random_batch()
    full = net(x, lengths)  # [4, 7, K]
    for i in range(4):
        n = int(lengths[i])
        alone = net(x[i : i + 1, :n], lengths[i : i + 1])  # no neighbours, no padding
        assert torch.allclose(alone[0], full[i, :n], atol=1e-6)
    wider = torch.cat([x, torch.zeros(4, 3, x.shape[-1], dtype=x.dtype)], 1)  # 3 more padded steps
    assert torch.allclose(net(wider, lengths)[:, :7], full, atol=1e-6)
    # Changing another sentence (and another sentence's length) leaves sentence 0 alone.
    other = x.clone()
    other[1:, :, 0] = 1
    assert torch.allclose(net(other, torch.tensor([7, 7, 2, 4]))[0], full[0], atol=1e-6)


def test_characters_reach_the_output():
    net = tagger("linear")
    x, lengths = random_batch()
    changed = x.clone()
    changed[0, 0, 2] = 11 if x[0, 0, 2] != 11 else 10  # another first letter, same word and POS id
    assert not torch.allclose(net(changed, lengths)[0, 0], net(x, lengths)[0, 0])


def test_bad_head_and_bad_input_are_refused():
    with pytest.raises(DspError, match="head"):
        WordTagger(5, 30, 6, 12, head="gru")
    with pytest.raises(DspError, match=r"\[B, T, 2 \+ C\]"):
        tagger("linear")(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3, 3]))


def test_pretrained_vectors_initialise_the_words_found(tmp_path):
    vocab = ["<pad>", "<unk>", "the", "Market", "zebra"]
    path = tmp_path / "vectors.txt"
    path.write_text("3 4\nthe 1 2 3 4\nmarket 5 6 7 8\nunused 9 9 9 9\n\n")  # word2vec header, blank line
    torch.manual_seed(0)
    before = WordTagger(5, 5, 6, 12, **{**SMALL, "word_dim": 4}).words.weight.detach().clone()
    torch.manual_seed(0)
    net = WordTagger(5, 5, 6, 12, **{**SMALL, "word_dim": 4}, pretrained=path, vocab=vocab)
    w = net.words.weight.detach()
    assert net.pretrained_found == 2
    assert torch.equal(w[2], torch.tensor([1.0, 2, 3, 4]))
    assert torch.equal(w[3], torch.tensor([5.0, 6, 7, 8]))  # "Market" falls back to "market"
    assert torch.equal(w[4], before[4]) and torch.equal(w[:2], before[:2])  # not in the file: untouched
    assert net.words.weight.requires_grad  # fine-tuned, not frozen


def test_pretrained_vectors_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("the 1 2 3\n")
    kwargs = {**SMALL, "word_dim": 4}
    with pytest.raises(DspError, match="line 1"):
        WordTagger(5, 3, 6, 12, **kwargs, pretrained=bad, vocab=["<pad>", "<unk>", "the"])
    with pytest.raises(DspError, match="vocab"):
        WordTagger(5, 3, 6, 12, **kwargs, pretrained=bad)
    with pytest.raises(DspError, match="cannot read"):
        WordTagger(5, 3, 6, 12, **kwargs, pretrained=tmp_path / "missing.txt", vocab=["<pad>", "<unk>", "the"])


@pytest.mark.parametrize("head", ["linear", "bilstm"])
def test_chain_crf_on_the_tiny_corpus_reduces_the_loss(head, tmp_path):
    data = load_conll2000(*write_conll(tmp_path / "conll2000"))
    x, y = data.train.tensors
    v = data.vocab
    torch.manual_seed(0)
    model = ChainCRF(data.num_labels, WordTagger(data.num_labels, len(v["words"]), len(v["pos"]), len(v["chars"]),
                                                 head=head, **SMALL))
    objective = MarginalCrossEntropy()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(15):
        loss, _ = objective.loss(model, None, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("preset,head", [("crf_chunking_joint", "linear"), ("crf_chunking_online", "linear"),
                                         ("crf_chunking_bilstm", "bilstm")])
def test_chunking_presets_build_the_model_from_the_data_vocabularies(preset, head, tmp_path):
    train, test = write_conll(tmp_path / "conll2000")
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}", f"data.train={train}", f"data.test={test}"])
    data = build_data(cfg)
    model = build_model(cfg)
    assert model.unary_net.words.num_embeddings == len(data.vocab["words"])
    assert model.unary_net.chars.embed.num_embeddings == len(data.vocab["chars"])
    assert (head == "bilstm") == hasattr(model.unary_net.head, "lstm")
    x, y = data.val.tensors
    assert model.unary_net(x, (y >= 0).sum(-1)).shape == (*y.shape, data.num_labels)


def test_word_dropout_trains_the_unknown_row_and_is_off_at_prediction():
    x, lengths = random_batch()
    x[..., 0] = torch.where(x[..., 0] == 1, 2, x[..., 0])  # every word in the vocabulary
    net = tagger("linear", word_dropout=0.5)
    predicted = net(x, lengths)  # eval mode: the words go in as they are
    net.word_dropout = 0.0
    assert torch.equal(predicted, net(x, lengths))
    as_unknown = x.clone()
    as_unknown[..., 0] = torch.where(x[..., 0] > 0, 1, 0)  # every real word -> the unknown id
    net.train()
    net.word_dropout = 1.0 - 1e-9  # (the constructor refuses 1: all words unknown is no model)
    net.head.net[2].p = 0.0  # only word dropout is random now
    torch.manual_seed(0)
    assert torch.allclose(net(x, lengths), net.eval()(as_unknown, lengths))
    # At p = 0.5 the unknown row gets gradient, at p = 0 it does not (every word is in the vocabulary).
    for p, gets_gradient in [(0.5, True), (0.0, False)]:
        net.word_dropout = p
        net.train().zero_grad()
        net(x, lengths).sum().backward()
        assert (net.words.weight.grad[1].abs().sum() > 0) == gets_gradient
    with pytest.raises(DspError, match="word_dropout"):
        WordTagger(5, 30, 6, 12, word_dropout=1.0)
