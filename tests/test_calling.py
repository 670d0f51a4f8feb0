"""How the plug-in calls models it reaches through wrappers, what it says when the call
fails, which dict batches it accepts, and loading a posterior through the wrapper that
the fit went through (docs/models.md)."""

from __future__ import annotations

import pytest
import torch
from test_real_models import VOCAB, _text_batches, _tokens
from torch import Tensor, nn

from lam_plugin import EmbeddingPosterior, LaplaceEmbedder
from lam_plugin.calling import ModelCall, convention_module, mean_pooling
from lam_plugin.wrapping import check_inputs

WIDTH, DIM = 12, 6


class SizeReadingEncoder(nn.Module):
    """Called as Hugging Face ``AutoModel`` is (``forward(input_ids=..., attention_mask=...)``)
    and, as BERT does, reads ``input_ids.size()`` first: a dict passed positionally fails
    with an ``AttributeError``. Returns the ``[B, DIM]`` mean-pooled embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.dense = nn.Linear(WIDTH, DIM)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        batch, length = input_ids.size()
        mask = torch.ones(batch, length) if attention_mask is None else attention_mask.float()
        hidden = self.dense(torch.tanh(self.embed(input_ids)))
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


class FeatureDictModel(nn.Module):
    """Called as sentence-transformers modules are: ``forward(features)`` with one dict."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.proj = nn.Linear(WIDTH, DIM)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        pooled = self.embed(features["input_ids"]).mean(1)
        return {**features, "sentence_embedding": self.proj(pooled)}


class PassThrough(nn.Module):
    """A user's wrapper: ``forward(*args, **kwargs)`` hands everything to its one child."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.inner(*args, **kwargs)


class TwoChildWrapper(PassThrough):
    """A pass-through ``forward`` with two children: no single wrapped module to read."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__(inner)
        self.extra = nn.Linear(2, 2)


class Failing(nn.Module):
    """``forward(input_ids, ...)`` that raises ``error`` whatever it is given."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.error = error

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        raise self.error


# -- pass-through wrappers ----------------------------------------------------------------------
def test_a_pass_through_wrapper_is_called_as_the_module_it_wraps():
    torch.manual_seed(0)
    encoder = SizeReadingEncoder()
    x = _tokens(4, 5, 0)
    for wrapper in (PassThrough(encoder), PassThrough(PassThrough(encoder)), nn.DataParallel(encoder)):
        assert convention_module(wrapper) is encoder
        assert ModelCall().keywords(wrapper, x)
        torch.testing.assert_close(ModelCall().embed(wrapper, x), encoder(**x))
    compiled = torch.compile(encoder, backend="eager")  # OptimizedModule: forward(*args, **kwargs)
    assert convention_module(compiled) is encoder and ModelCall().keywords(compiled, x)
    st_like = FeatureDictModel()
    assert not ModelCall().keywords(PassThrough(st_like), x)  # forward(features): still one dict
    assert ModelCall().embed(PassThrough(st_like), x).shape == (4, DIM)
    post = LaplaceEmbedder(PassThrough(encoder), approx="pos", progress=False).fit(_text_batches())
    assert post.param_names and all(name.startswith("inner.") for name in post.param_names)


def test_a_hugging_face_bert_behind_a_pass_through_wrapper():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, vocab_size=VOCAB,
        max_position_embeddings=16,
    )
    bert = transformers.BertModel(config).eval()
    batches = [({**x, "token_type_ids": torch.zeros_like(x["input_ids"])}, y) for x, y in _text_batches()]
    post = LaplaceEmbedder(PassThrough(bert), output_key=mean_pooling, approx="pos", progress=False).fit(batches)
    assert post.param_names[0].startswith("inner.encoder.layer.0.")
    assert post.predict(batches[0][0], n=2).mean.shape == (8, 16)


# -- errors of the call ---------------------------------------------------------------------------
def test_an_automatic_convention_that_fails_names_the_option():
    x = _tokens(4, 5, 0)
    wrapper = TwoChildWrapper(SizeReadingEncoder())  # no single child: model(batch), and BERT-like .size() fails
    assert not ModelCall().keywords(wrapper, x)
    hint = (
        r"calling TwoChildWrapper\(batch\) \(chosen from the signature of forward\) with batch keys "
        r"\['attention_mask', 'input_ids'\] failed: AttributeError: .*call='keywords'"
    )
    with pytest.raises(TypeError, match=hint) as info:
        ModelCall().embed(wrapper, x)
    assert isinstance(info.value.__cause__, AttributeError)
    params = dict(wrapper.named_parameters())
    with pytest.raises(TypeError, match=hint):
        ModelCall().functional(wrapper, params, x)
    with pytest.raises(TypeError, match=hint):
        LaplaceEmbedder(wrapper, progress=False).fit(_text_batches())
    assert ModelCall(convention="keywords").embed(wrapper, x).shape == (4, DIM)


@pytest.mark.parametrize("error", [KeyError("input_ids"), IndexError("index 0"), ValueError("input_ids or inputs_embeds")])
def test_errors_a_wrong_convention_raises_get_the_hint(error):
    x = _tokens(4, 5, 0)
    with pytest.raises(TypeError, match=f"failed: {type(error).__name__}.*call='positional'") as info:
        ModelCall().embed(Failing(error), x)
    assert info.value.__cause__ is error


def test_other_errors_come_through_as_the_model_raised_them():
    x = _tokens(4, 5, 0)
    error = RuntimeError("data-dependent control flow")  # what vmap raises: the posterior falls back on it
    with pytest.raises(RuntimeError) as info:
        ModelCall().embed(Failing(error), x)
    assert info.value is error
    attribute = AttributeError("no such attribute")  # a convention the user chose: their model's error
    with pytest.raises(AttributeError) as by_choice:
        ModelCall(convention="keywords").embed(Failing(attribute), x)
    assert by_choice.value is attribute


# -- dict batches ---------------------------------------------------------------------------------
def test_dict_batches_must_hold_one_row_per_item():
    flattened = {"input_ids": torch.randint(1, VOCAB, (19,)), "offsets": torch.tensor([0, 3, 5, 9, 12, 15])}
    refusal = r"one row per item.*\{'input_ids': 19, 'offsets': 6\}.*EmbeddingBag"
    with pytest.raises(ValueError, match=refusal):
        check_inputs(flattened)
    with pytest.raises(ValueError, match=refusal):
        LaplaceEmbedder(FeatureDictModel(), progress=False).fit([(flattened, torch.arange(6) % 2)])
    with pytest.raises(ValueError, match=r"\{'input_ids': 4, 'scale': 0-dim\}"):
        check_inputs({"input_ids": torch.ones(4, 5, dtype=torch.long), "scale": torch.tensor(1.0)})
    bert_like = {**_tokens(4, 5, 0), "token_type_ids": torch.zeros(4, 5, dtype=torch.long), "modality": "text"}
    check_inputs(bert_like)  # all [B, T]; a string entry comes along


# -- loading through the fit's wrapper ------------------------------------------------------------
def test_a_posterior_loads_through_the_wrapper_it_was_fitted_through(tmp_path):
    torch.manual_seed(0)
    wrapped = nn.DataParallel(nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)))
    x, y = torch.randn(8, 6), torch.arange(8) % 2
    post = LaplaceEmbedder(wrapped, approx="pos", progress=False).fit([(x, y)])
    post.save(tmp_path / "post.safetensors")
    for model in (wrapped, wrapped.module):
        loaded = EmbeddingPosterior.load(tmp_path / "post.safetensors", model)
        assert loaded.param_names == post.param_names == ["2.weight", "2.bias"]
        assert loaded.model is wrapped.module
        torch.testing.assert_close(loaded.curvature, post.curvature)


def test_a_compiled_model_is_fitted_and_loaded_as_the_module_it_compiles(tmp_path):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    compiled = torch.compile(plain, backend="eager")
    x, y = torch.randn(8, 6), torch.arange(8) % 2
    post = LaplaceEmbedder(compiled, subset="all", approx="pos", progress=False).fit([(x, y)])
    assert post.model is plain and post.param_names == [n for n, _ in plain.named_parameters()]
    post.save(tmp_path / "post.safetensors")
    for model in (compiled, plain, nn.DataParallel(compiled)):
        loaded = EmbeddingPosterior.load(tmp_path / "post.safetensors", model)
        assert loaded.model is plain
        torch.testing.assert_close(loaded.curvature, post.curvature)
