"""The trainer's compact text path gives open_clip's text features and, after training, the same model."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch

from training.compact_text import CompactTextTower
from worker.engine.models import register_project_configs

CAPTIONS = ["a red circle on the left and a blue star at the top right.", "two stars.",
            "a photo of three shapes: a green square, a purple cross and a yellow triangle."]


@pytest.fixture()
def model_and_tokenizer():
    register_project_configs()
    torch.manual_seed(0)
    return open_clip.create_model("maskinv-scene-tiny"), open_clip.get_tokenizer("maskinv-scene-tiny")


def test_features_equal_encode_text(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = tok(CAPTIONS)  # [3, 48], padded with 0
    tower = CompactTextTower(model)
    with torch.no_grad():
        assert torch.allclose(tower(ids), model.encode_text(ids), atol=1e-5)
    assert tower.used == len(torch.unique(ids[:, :int((ids != 0).sum(1).max())]))


def test_training_through_the_compact_table_gives_the_same_model(model_and_tokenizer):
    model, tok = model_and_tokenizer
    twin = copy.deepcopy(model)
    initial = model.token_embedding.weight.detach().clone()
    tower = CompactTextTower(twin)
    opt_full = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt_compact = torch.optim.AdamW(tower.parameters_to_train(), lr=1e-2, weight_decay=0.0)
    untouched = tok(["a heart."])[0, 2:3]  # "heart": a token that no training caption holds
    batches = [tok(CAPTIONS), tok(["a purple cross in the middle."] * 3), tok(CAPTIONS[::-1])]
    for ids in batches:  # the second batch brings new tokens into the compact table
        for opt, encode in ((opt_full, model.encode_text), (opt_compact, tower)):
            opt.zero_grad()
            encode(ids).pow(2).sum().backward()
            opt.step()
    tower.write_back()
    full, compact = dict(model.named_parameters()), dict(twin.named_parameters())
    for name, p in full.items():
        if name.endswith("attn.in_proj_bias"):  # the key bias never changes an output: its gradient is round-off,
            width = p.shape[0] // 3  # which Adam scales up, so compare the query and value biases only
            p, q = torch.cat([p[:width], p[2 * width:]]), torch.cat([compact[name][:width], compact[name][2 * width:]])
        else:
            q = compact[name]
        assert torch.allclose(p, q, atol=1e-5), name
    assert torch.equal(twin.token_embedding.weight[untouched], initial[untouched])
    assert torch.equal(model.token_embedding.weight[untouched], initial[untouched])
    with torch.no_grad():
        for ids in batches:
            assert torch.allclose(twin.encode_text(ids), model.encode_text(ids), atol=1e-5)


def test_a_full_table_says_so(model_and_tokenizer):
    model, tok = model_and_tokenizer
    tower = CompactTextTower(model, capacity=4)
    with pytest.raises(RuntimeError, match="compact token table is full"):
        tower(tok(CAPTIONS))

