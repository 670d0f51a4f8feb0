"""The plug-in on models as their libraries build them: how they are called, how the
embedding is taken from their output, the batches their ecosystems make, which layer is
the last one, and the refusals of fits that would silently return the prior."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lam_plugin import LaplaceEmbedder, UncertainIndex
from lam_plugin._batches import iter_inputs, labelled, stack_pairs
from lam_plugin.calling import ModelCall, mean_pooling

VOCAB, WIDTH, DIM = 30, 12, 6


class FeatureDictModel(nn.Module):
    """Called as sentence-transformers modules are: ``forward(features)`` with one dict,
    returning the dict with ``"sentence_embedding"`` added."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.proj = nn.Linear(WIDTH, DIM)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        assert not ({"labels", "label"} & set(features)), "a label key reached the model"
        mask = features["attention_mask"].unsqueeze(-1).float()
        pooled = (self.embed(features["input_ids"]) * mask).sum(1) / mask.sum(1)
        return {**features, "sentence_embedding": nn.functional.normalize(self.proj(pooled), dim=-1)}


@dataclass
class EncoderOutput:
    """A stand-in for a Hugging Face ``ModelOutput``: fields read as attributes."""

    last_hidden_state: Tensor
    pooler_output: Tensor


class KeywordEncoder(nn.Module):
    """Called as Hugging Face ``AutoModel`` is: ``forward(input_ids=..., attention_mask=...)``;
    its pooler runs last, but a mean-pooled embedding does not use it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.dense = nn.Linear(WIDTH, DIM)
        self.pooler = nn.Linear(DIM, DIM)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> EncoderOutput:
        hidden = self.dense(torch.tanh(self.embed(input_ids)))
        return EncoderOutput(hidden, torch.tanh(self.pooler(hidden[:, 0])))


class TwoHeads(nn.Module):
    """``{"emb": normalize(proj(h)), "logits": cls(h)}``: the classifier runs last."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(10, 16)
        self.proj = nn.Linear(16, 4)
        self.cls = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = torch.relu(self.body(x))
        emb = nn.functional.normalize(self.proj(h), dim=-1)
        return {"emb": emb, "logits": self.cls(h)}


def _tokens(n: int, length: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length - 2 :] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def _text_batches(n_batches: int = 2, size: int = 8) -> list[tuple[dict[str, Tensor], Tensor]]:
    return [(_tokens(size, 5, seed), torch.arange(size) % 3) for seed in range(n_batches)]


# -- calling ------------------------------------------------------------------------------
def test_dict_batch_is_passed_as_its_library_passes_it():
    features = _tokens(4, 5, 0)
    st_like, hf_like = FeatureDictModel(), KeywordEncoder()
    assert not ModelCall().keywords(st_like, features)
    assert ModelCall().keywords(hf_like, features)
    emb = ModelCall().embed(st_like, features)  # "sentence_embedding" with no option
    assert emb.shape == (4, DIM)
    pooled = ModelCall(mean_pooling).embed(hf_like, features)
    hidden = hf_like(**features).last_hidden_state
    mask = features["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(pooled, (hidden * mask).sum(1) / mask.sum(1))
    by_attribute = ModelCall("pooler_output").embed(hf_like, features)
    torch.testing.assert_close(by_attribute, hf_like(**features).pooler_output)


def test_call_option_overrides_the_convention():
    class Kwargs(nn.Module):
        def forward(self, **inputs: Tensor) -> Tensor:
            return inputs["a"] * 2

    x = {"a": torch.ones(3, 2)}
    assert ModelCall().keywords(Kwargs(), x)  # no positional parameter: keywords
    with pytest.raises(TypeError, match=r"calling Kwargs\(batch\) with batch keys \['a'\] failed"):
        ModelCall(convention="positional").embed(Kwargs(), x)
    with pytest.raises(ValueError, match="call must be one of"):
        ModelCall(convention="star")  # type: ignore[arg-type]


def test_bad_models_and_outputs_fail_before_any_work():
    loader = _text_batches()
    with pytest.raises(TypeError, match=r"KeywordEncoder\(batch\) with batch keys \['attention_mask', 'input_ids'\]"):
        LaplaceEmbedder(KeywordEncoder(), call="positional", progress=False).fit(loader)
    with pytest.raises(TypeError, match="EncoderOutput, not a tensor; pass output_key="):
        LaplaceEmbedder(KeywordEncoder(), progress=False).fit(loader)
    with pytest.raises(ValueError, match=r"must have shape \[B, D\], got \(8, 5, 6\)"):
        LaplaceEmbedder(KeywordEncoder(), output_key="last_hidden_state", progress=False).fit(loader)
    with pytest.raises(ValueError, match=r"output_key='nope'.*keys \['emb', 'logits'\]"):
        LaplaceEmbedder(TwoHeads(), output_key="nope", progress=False).fit([(torch.randn(6, 10), torch.arange(6) % 2)])
    with pytest.raises(ValueError, match="subset='proj2' is not 'all', 'last_layer' or the name of a module"):
        LaplaceEmbedder(TwoHeads(), subset="proj2", output_key="emb", progress=False).fit(
            [(torch.randn(6, 10), torch.arange(6) % 2)]
        )


# -- which layer is the last one ------------------------------------------------------------
def test_last_layer_is_the_last_linear_the_embedding_uses():
    x, y = torch.randn(12, 10), torch.arange(12) % 3
    post = LaplaceEmbedder(TwoHeads(), output_key="emb", approx="pos", geometry="euclidean", progress=False).fit(
        [(x, y)]
    )
    assert post.param_names == ["proj.weight", "proj.bias"] and post.stats.backend == "last_layer"
    assert post.curvature.abs().max() > 0
    encoder = KeywordEncoder()
    post = LaplaceEmbedder(encoder, output_key=mean_pooling, backend="torch.func", progress=False).fit(_text_batches())
    assert post.param_names == ["dense.weight", "dense.bias"]  # not the pooler, which runs last
    named = LaplaceEmbedder(TwoHeads(), subset="body", output_key="emb", backend="torch.func", progress=False)
    assert named.fit([(x, y)]).param_names == ["body.weight", "body.bias"]


def test_a_fit_with_no_positive_pair_is_refused():
    x = torch.randn(6, 10)
    with pytest.raises(ValueError, match="no positive pair in any batch"):
        LaplaceEmbedder(TwoHeads(), output_key="emb", approx="pos", progress=False).fit([(x, torch.arange(6))])


def test_parameters_without_curvature_are_named(caplog):
    x, y = torch.randn(12, 10), torch.arange(12) % 3
    with caplog.at_level(logging.WARNING, logger="lam_plugin"):
        post = LaplaceEmbedder(
            TwoHeads(), subset="all", output_key="emb", approx="pos", geometry="euclidean", progress=False
        ).fit([(x, y)])
    assert post.curvature[-(16 * 3 + 3) :].abs().max() == 0
    assert any("cls.weight, cls.bias get no curvature" in r.getMessage() for r in caplog.records)


# -- batches ---------------------------------------------------------------------------------
def test_labels_in_dict_batches_never_reach_the_model():
    model = FeatureDictModel()
    batches = [{**features, "label": labels} for features, labels in _text_batches()]
    post = LaplaceEmbedder(model, subset="all", progress=False).fit(batches)  # the model asserts it
    with_labels = post.predict({**batches[0], "labels": torch.zeros(8)}, generator=torch.Generator().manual_seed(0))
    plain = post.predict(_text_batches()[0][0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(with_labels.mean, plain.mean)
    index = UncertainIndex(post, n_samples=4, progress=False).add(batches)
    assert len(index) == 16


def test_pair_batches_make_each_pair_its_own_class():
    anchors, positives = _tokens(4, 5, 1), _tokens(4, 7, 2)
    x, y = labelled((anchors, positives))
    assert y.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert x["input_ids"].shape == (8, 7) and (x["attention_mask"][:4, 5:] == 0).all()
    model = FeatureDictModel()
    # padding with masked tokens leaves each embedding as it was
    torch.testing.assert_close(ModelCall().embed(model, x)[:4], ModelCall().embed(model, anchors))
    from_pairs = LaplaceEmbedder(model, subset="all", progress=False).fit([(anchors, positives)])
    explicit = LaplaceEmbedder(model, subset="all", progress=False).fit([(x, y)])
    torch.testing.assert_close(from_pairs.curvature, explicit.curvature)
    images = labelled((torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)))
    assert images[0].shape == (6, 1, 4, 4) and images[1].tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="as many positives as anchors"):
        stack_pairs(anchors, _tokens(3, 5, 0))
    # sentence-transformers' preprocessing adds {"modality": "text"}: kept, not stacked
    tagged, _ = stack_pairs({**anchors, "modality": "text"}, {**positives, "modality": "text"})
    assert tagged["modality"] == "text" and tagged["input_ids"].shape == (8, 7)
    with pytest.raises(TypeError, match="'text' and 'image'"):
        stack_pairs({**anchors, "modality": "text"}, {**positives, "modality": "image"})


def test_a_loader_is_streamed_with_the_same_weight_samples():
    torch.manual_seed(0)
    model = TwoHeads()
    x, y = torch.randn(24, 10), torch.arange(24) % 3
    post = LaplaceEmbedder(model, subset="all", output_key="emb", backend="torch.func", progress=False).fit([(x, y)])
    loader = DataLoader(TensorDataset(x, y), batch_size=5)  # labelled batches: the labels are dropped
    streamed = post.predict(loader, n=6, generator=torch.Generator().manual_seed(1), return_samples=True)
    whole = post.predict(x, n=6, generator=torch.Generator().manual_seed(1), return_samples=True)
    torch.testing.assert_close(streamed.samples, whole.samples)
    torch.testing.assert_close(streamed.std, whole.std)
    unlabelled = post.sample([x[:10], x[10:]], n=6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(unlabelled, whole.samples)
    assert len(list(iter_inputs(loader))) == 5


def test_weight_samples_are_drawn_in_chunks(monkeypatch):
    import lam_plugin.posterior as posterior_module

    torch.manual_seed(0)
    x, y = torch.randn(12, 10), torch.arange(12) % 3
    post = LaplaceEmbedder(TwoHeads(), subset="all", output_key="emb", progress=False).fit([(x, y)])
    n_params = post.mean.numel()
    whole = post.sample(x, n=5, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(posterior_module, "_WEIGHT_FLOATS", 2 * n_params)
    chunks = list(post.weight_chunks(5, torch.Generator().manual_seed(2)))
    assert [c.shape[0] for c in chunks] == [2, 2, 1]
    seen: list[int] = []
    original = post._embed
    monkeypatch.setattr(post, "_embed", lambda xb, w, c: seen.append(w.shape[0]) or original(xb, w, c))
    chunked = post.sample(x, n=5, generator=torch.Generator().manual_seed(2))
    assert seen == [2, 2, 1]
    expected = torch.cat([original(x, w, None) for w in chunks])
    torch.testing.assert_close(chunked, nn.functional.normalize(expected, dim=-1))
    assert chunked.shape == whole.shape


# -- backends ------------------------------------------------------------------------------
class WritesIntoFeatures(nn.Module):
    """Writes its outputs into the dict it is given, as sentence-transformers modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = FeatureDictModel()

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        features.update(self.inner(features))
        return features


def test_the_users_dict_batches_come_back_unchanged():
    batches = _text_batches()
    keys = [set(features) for features, _ in batches]
    post = LaplaceEmbedder(WritesIntoFeatures(), subset="all", progress=False).fit(batches)
    post.predict(batches[0][0], n=3)
    UncertainIndex(post, n_samples=3, progress=False).add([features for features, _ in batches])
    assert [set(features) for features, _ in batches] == keys


class WeightUsedTwice(nn.Module):
    """``lin.weight`` is used inside ``lin`` and again outside it: module hooks see only
    the first use. The LayerNorm keeps BackPACK out."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.lin(x)) + nn.functional.linear(x, self.lin.weight)
        return self.out(nn.functional.gelu(h))


def test_auto_falls_back_to_torch_func_when_the_hooks_backend_refuses(caplog):
    torch.manual_seed(0)
    model = WeightUsedTwice().double()
    batches = [(torch.randn(8, 6, dtype=torch.float64), torch.arange(8) % 3) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="lam_plugin"):
        auto = LaplaceEmbedder(model, subset="all", progress=False).fit(batches)
    assert auto.stats.backend == "torch.func"
    assert any("outside that module's forward" in r.getMessage() for r in caplog.records)
    reference = LaplaceEmbedder(model, subset="all", backend="torch.func", progress=False).fit(batches)
    torch.testing.assert_close(auto.curvature, reference.curvature)
    from lam_plugin.curvature.base import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="outside that module's forward"):
        LaplaceEmbedder(model, subset="all", backend="hooks", progress=False).fit(batches)
