"""ClipCap captioner: architecture, decoding, save/load, environment factory and loading errors (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.text import clipcap
from worker.settings import CaptionerSettings
from worker.text.clipcap import (CaptionerError, ClipCapCaptioner, ClipCapConfig, load_captioner, load_clipcap,
                                 save_clipcap)
from training.train_clipcap import (FitConfig, build_captioner, encode_captions, fit, tiny_gpt2,
                                  train_bpe_tokenizer)

CAPTIONS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")]
CLIP_DIM = 32


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CAPTIONS, vocab_size=300)


def make_cap(tokenizer, mapping: str = "mlp", clip_dim: int = CLIP_DIM, seed: int = 0):
    cfg = ClipCapConfig(clip_dim=clip_dim, prefix_length=4, mapping=mapping, clip_length=3, mapping_layers=2,
                        mapping_heads=4, clip_model={"name": "maskinv-test-tiny"})
    lm = tiny_gpt2(len(tokenizer), tokenizer.eos_token_id, n_layer=2, n_embd=32, n_head=4, n_positions=24,
                   seed=seed)
    cap = build_captioner(cfg, lm, tokenizer, seed=seed)
    cap.model.eval()
    return cap


@pytest.fixture(scope="module", params=["mlp", "transformer"])
def cap(request, tokenizer):
    return make_cap(tokenizer, request.param)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer) -> Path:
    return save_clipcap(make_cap(tokenizer, "mlp"), tmp_path_factory.mktemp("cap") / "captioner")


def embeddings(n: int, seed: int = 0) -> torch.Tensor:
    return 3.0 * torch.randn(n, CLIP_DIM, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("decoding", ["greedy", "beam"])
@pytest.mark.parametrize("n", [0, 1, 5])
def test_caption_shapes(cap, decoding, n):
    captioner = ClipCapCaptioner(cap, decoding=decoding, beam_size=3, max_tokens=6)
    ids = captioner.caption_ids(embeddings(n))
    assert len(ids) == n
    assert all(len(x) <= 6 and cap.eos_id not in x for x in ids)
    texts = captioner.caption(embeddings(n), ["ignored"] * n)
    assert len(texts) == n and all(isinstance(t, str) for t in texts)
    assert captioner.mode == "clipcap"


def test_prefix_shape_and_normalisation(cap):
    e = embeddings(3)
    p = cap.model.prefix(e)
    assert p.shape == (3, 4, cap.model.embed_dim)
    torch.testing.assert_close(cap.model.prefix(7.0 * e), p)  # inputs are L2-normalised
    with pytest.raises(ValueError, match=r"\[N, 32\]"):
        cap.model.prefix(torch.zeros(2, 31))


def reference_greedy(cap, emb: torch.Tensor, max_tokens: int) -> list[int]:
    """Greedy decoding without the key/value cache: the whole sequence through GPT-2 at every step."""
    model = cap.model
    seq = model.prefix(emb[None])
    ids: list[int] = []
    for _ in range(max_tokens):
        logits = model.lm(inputs_embeds=seq).logits[0, -1]
        tok = int(logits.argmax())
        if tok == cap.eos_id:
            break
        ids.append(tok)
        seq = torch.cat([seq, model.lm.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
    return ids


@torch.no_grad()
def test_greedy_matches_uncached_reference(cap):
    e = embeddings(4, seed=1)
    got = ClipCapCaptioner(cap, "greedy", max_tokens=8).caption_ids(e)
    assert got == [reference_greedy(cap, x, 8) for x in e]


@torch.no_grad()
def test_beam_of_one_is_greedy(cap):
    e = embeddings(4, seed=2)
    greedy = ClipCapCaptioner(cap, "greedy", max_tokens=8).caption_ids(e)
    assert ClipCapCaptioner(cap, "beam", beam_size=1, max_tokens=8).caption_ids(e) == greedy


@torch.no_grad()
def test_exhaustive_beam_finds_best_two_token_caption(cap):
    """With a beam as wide as the vocabulary and two tokens, beam search is exhaustive search."""
    e = embeddings(2, seed=3)
    model, eos = cap.model, cap.eos_id
    vocab = model.lm.config.vocab_size
    got = model.generate(e, eos, beam_size=vocab, max_tokens=2, length_penalty=0.0)
    wte = model.lm.get_input_embeddings()
    for k in range(2):
        prefix = model.prefix(e[k:k + 1])
        lp1 = F.log_softmax(model.lm(inputs_embeds=prefix).logits[0, -1], -1)  # [V]
        seqs = torch.cat([prefix.expand(vocab, -1, -1), wte(torch.arange(vocab))[:, None]], dim=1)
        lp2 = F.log_softmax(model.lm(inputs_embeds=seqs).logits[:, -1], -1)  # [V, V]
        total = lp1[:, None] + lp2
        total[eos] = float("-inf")
        best_pair = divmod(int(total.argmax()), vocab)
        best = [best_pair[0], best_pair[1]] if float(total.max()) > float(lp1[eos]) else []
        expected = best[:best.index(eos)] if eos in best else best
        assert got[k] == expected


@torch.no_grad()
def test_batched_decoding_equals_one_by_one(cap):
    e = embeddings(6, seed=4)
    for decoding in ("greedy", "beam"):
        captioner = ClipCapCaptioner(cap, decoding, beam_size=3, max_tokens=8)
        batched = captioner.caption_ids(e)
        assert batched == [captioner.caption_ids(x[None])[0] for x in e]
        assert ClipCapCaptioner(cap, decoding, beam_size=3, max_tokens=8, batch_size=4).caption_ids(e) == batched


@torch.no_grad()
def test_decoding_is_deterministic(tokenizer):
    e = embeddings(5, seed=5)
    a = ClipCapCaptioner(make_cap(tokenizer, "transformer"), "beam").caption(e)
    b = ClipCapCaptioner(make_cap(tokenizer, "transformer"), "beam").caption(e)
    assert a == b


def test_training_learns_the_captions(tokenizer):
    """A few hundred steps on 12 (embedding, caption) pairs: greedy and beam decoding reproduce them."""
    torch.manual_seed(0)
    cap = make_cap(tokenizer, "mlp", seed=1)
    protos = embeddings(len(CAPTIONS), seed=6)
    gen = torch.Generator().manual_seed(7)
    emb = protos.repeat(8, 1) + 0.05 * torch.randn(8 * len(CAPTIONS), CLIP_DIM, generator=gen)
    tokens, lengths = encode_captions(tokenizer, CAPTIONS * 8, max_tokens=20)
    history = fit(cap, emb, tokens, lengths, FitConfig(epochs=30, batch_size=16, lr=5e-3, lm_lr=5e-3,
                                                       train_lm=True, warmup=10))
    assert history[-1] < 0.25 * history[0]
    assert not cap.model.training and not any(p.requires_grad for p in cap.model.parameters())
    for decoding in ("greedy", "beam"):
        assert ClipCapCaptioner(cap, decoding, max_tokens=10).caption(protos) == CAPTIONS


def test_encode_captions_pads_and_ends_with_eos(tokenizer):
    tokens, lengths = encode_captions(tokenizer, ["a red circle", "a blue square on the left"], max_tokens=4)
    assert tokens.shape == (2, int(lengths.max()))
    for row, n in zip(tokens.tolist(), lengths.tolist()):
        assert row[n - 1] == tokenizer.eos_token_id and n <= 4
    assert tokenizer.decode(tokens[0, :lengths[0] - 1].tolist()) == "a red circle"


# ------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_save_load_round_trip(tmp_path, tokenizer, mapping):
    cap = make_cap(tokenizer, mapping, seed=3)
    out = save_clipcap(cap, tmp_path / "c")
    assert {p.name for p in out.iterdir()} == {"clipcap.json", "mapping.safetensors", "gpt2", "tokenizer"}
    back = load_clipcap(out)
    assert back.cfg == cap.cfg
    e = embeddings(5, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(back.model.prefix(e), cap.model.prefix(e), rtol=0, atol=0)
    for decoding in ("greedy", "beam"):
        assert (ClipCapCaptioner(back, decoding).caption(e) == ClipCapCaptioner(cap, decoding).caption(e))
    assert load_clipcap(out / "clipcap.json").cfg == cap.cfg  # the config file's path works too


def test_hub_id_is_downloaded_with_huggingface_hub(monkeypatch, saved):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(saved)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    cap = load_clipcap("someone/tiny-clipcap")
    assert calls == ["someone/tiny-clipcap"] and cap.cfg.clip_dim == CLIP_DIM


def test_hub_failure_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CaptionerError, match="could not be fetched from the hub.*mount the captioner"):
        load_clipcap("someone/tiny-clipcap")


def broken_copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(saved, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    data = json.loads((path / "clipcap.json").read_text())
    data.update(changes)
    (path / "clipcap.json").write_text(json.dumps(data))


@pytest.mark.parametrize("case, pattern", [
    ("missing_path", "does not exist"),
    ("empty_dir", "has no clipcap.json"),
    ("other_file", "is not a clipcap.json"),
    ("bad_json", "not valid JSON"),
    ("wrong_format", "not a maskinv-clipcap configuration"),
    ("wrong_version", "format version 99"),
    ("unknown_field", r"unknown field\(s\) \['colour'\]"),
    ("bad_mapping", "mapping must be one of"),
    ("bad_prefix", "prefix_length must be a positive integer"),
    ("no_mapping_weights", "lacks its mapping weights"),
    ("mismatched_weights", "do not fit clipcap.json"),
    ("missing_gpt2", "neither a sub-directory"),
    ("broken_gpt2", "cannot load GPT-2"),
])
def test_loading_errors_are_clear(tmp_path, saved, case, pattern):
    path = broken_copy(saved, tmp_path)
    source: Path | str = path
    if case == "missing_path":
        source = tmp_path / "nowhere" / "captioner"
    elif case == "empty_dir":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "other_file":
        source = path / "mapping.safetensors"
    elif case == "bad_json":
        (path / "clipcap.json").write_text("{not json")
    elif case == "wrong_format":
        edit_config(path, format="something-else")
    elif case == "wrong_version":
        edit_config(path, version=99)
    elif case == "unknown_field":
        edit_config(path, colour="red")
    elif case == "bad_mapping":
        edit_config(path, mapping="lstm")
    elif case == "bad_prefix":
        edit_config(path, prefix_length=0)
    elif case == "no_mapping_weights":
        (path / "mapping.safetensors").unlink()
    elif case == "mismatched_weights":
        edit_config(path, clip_dim=CLIP_DIM + 1)
    elif case == "missing_gpt2":
        shutil.rmtree(path / "gpt2")
        edit_config(path, gpt2="no such dir!")
    elif case == "broken_gpt2":
        (path / "gpt2" / "config.json").write_text("{}")
    with pytest.raises(CaptionerError, match=pattern):
        load_clipcap(source)


def test_decoding_settings_are_checked(cap):
    with pytest.raises(CaptionerError, match="decoding must be one of"):
        ClipCapCaptioner(cap, decoding="sample")
    with pytest.raises(CaptionerError, match=">= 1"):
        ClipCapCaptioner(cap, beam_size=0)
    with pytest.raises(CaptionerError, match="positions GPT-2 has after the 4-token prefix"):
        ClipCapCaptioner(cap, max_tokens=100)
    with pytest.raises(ValueError, match=r"\[N, 32\]"):
        ClipCapCaptioner(cap).caption(torch.zeros(2, 8), ["a", "b"])


# ------------------------------------------------------------------------------------------ environment
def load_captioner_from_env(scorer):
    """The captioner that ``MASKINV_CAPTIONER`` and the caption decoding variables name (their errors raise
    CaptionerError naming the variable)."""
    return load_captioner(scorer, CaptionerSettings.from_env(error=CaptionerError))


class FakeScorer:
    """What load_captioner reads from a LabelScorer: ``.clip`` (embed_dim, name, device)."""

    def __init__(self, embed_dim: int = CLIP_DIM, name: str = "maskinv-test-tiny"):
        self.clip = type("Clip", (), {"embed_dim": embed_dim, "name": name, "device": torch.device("cpu")})()


ENV = ("MASKINV_CAPTIONER", "MASKINV_CAPTION_DECODING", "MASKINV_CAPTION_BEAM", "MASKINV_CAPTION_MAX_TOKENS",
       "MASKINV_CAPTION_LENGTH_PENALTY")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("value", [None, "", "  ", "none"])
def test_no_captioner_configured(clean_env, value):
    if value is not None:
        clean_env.setenv("MASKINV_CAPTIONER", value)
    assert load_captioner_from_env(FakeScorer()) is None


def test_captioner_from_env(clean_env, saved):
    clean_env.setenv("MASKINV_CAPTIONER", str(saved))
    c = load_captioner_from_env(FakeScorer())
    assert isinstance(c, ClipCapCaptioner)
    assert (c.decoding, c.beam_size, c.max_tokens, c.length_penalty) == ("beam", 3, 20, 1.0)
    for name, value in zip(ENV[1:], ("greedy", "5", "12", "0.5")):
        clean_env.setenv(name, value)
    c = load_captioner_from_env(FakeScorer())
    assert (c.decoding, c.beam_size, c.max_tokens, c.length_penalty) == ("greedy", 1, 12, 0.5)
    assert len(c.caption(embeddings(3), [""] * 3)) == 3  # no labels: the fake scorer has no text encoder


def test_captioner_from_env_with_real_scorer(clean_env, saved):
    from worker.text.labels import LabelScorer
    from worker.engine.models import load_clip

    clean_env.setenv("MASKINV_CAPTIONER", str(saved))
    scorer = LabelScorer(load_clip("maskinv-test-tiny", "none", "cpu"))
    c = load_captioner_from_env(scorer)
    assert c is not None and c.clip_dim == scorer.clip.embed_dim


@pytest.mark.parametrize("name, value, pattern", [
    ("MASKINV_CAPTION_DECODING", "nucleus", "decoding must be one of"),
    ("MASKINV_CAPTION_BEAM", "three", "MASKINV_CAPTION_BEAM must be an integer"),
    ("MASKINV_CAPTION_MAX_TOKENS", "0", ">= 1"),
    ("MASKINV_CAPTION_LENGTH_PENALTY", "x", "must be a number"),
    ("MASKINV_CAPTIONER", "/no/such/captioner", "does not exist"),
])
def test_env_errors(clean_env, saved, name, value, pattern):
    clean_env.setenv("MASKINV_CAPTIONER", str(saved))
    clean_env.setenv(name, value)
    with pytest.raises(CaptionerError, match=pattern):
        load_captioner_from_env(FakeScorer())


def test_embedding_size_mismatch_names_both_settings(clean_env, saved):
    clean_env.setenv("MASKINV_CAPTIONER", str(saved))
    with pytest.raises(CaptionerError, match=r"32-d embeddings .* 512-d .*MASKINV_CAPTIONER vs MASKINV_MODEL"):
        load_captioner_from_env(FakeScorer(embed_dim=512, name="ViT-B-16"))


def test_other_clip_model_warns(clean_env, saved, caplog):
    clean_env.setenv("MASKINV_CAPTIONER", str(saved))
    with caplog.at_level("WARNING", logger=clipcap.__name__):
        assert load_captioner_from_env(FakeScorer(name="maskinv-test-tiny-ls")) is not None
    assert "trained on CLIP maskinv-test-tiny" in caplog.text


def test_tokenizer_round_trips_unseen_text(tokenizer):
    text = "a purple hexagon, über-small!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
