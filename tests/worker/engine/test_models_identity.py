"""A model's identity (``ClipModel.id``) names its tower and weights, and every store of embeddings is keyed by it:
switching MASKINV_MODEL / MASKINV_PRETRAINED never mixes one tower's embeddings with another's (label prototypes,
the engine's image states, the result cache, the learned examples)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from backend.learning.learner import model_key
from worker.engine.engine import MaskInversionEngine
from worker.engine.models import load_clip
from worker.protocol.cache_keys import region_key
from worker.protocol.params import InversionParams
from worker.protocol import DEFAULT_TEMPLATES
from worker.text.labels import LabelScorer


def test_identity_names_tower_and_weights(tmp_path):
    a = load_clip("maskinv-test-tiny", "none", "cpu", seed=0)
    other_tower = load_clip("maskinv-test-tiny-ls", "none", "cpu", seed=0)
    other_seed = load_clip("maskinv-test-tiny", "none", "cpu", seed=1)
    ckpt = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in a.model.state_dict().items()}, str(ckpt))
    from_file = load_clip("maskinv-test-tiny", str(ckpt), "cpu")
    moved = tmp_path / "moved.safetensors"
    ckpt.rename(moved)
    assert len({a.id, other_tower.id, other_seed.id, from_file.id}) == 4
    assert load_clip("maskinv-test-tiny", str(moved), "cpu").id == from_file.id  # content, not path
    params = InversionParams.from_dict({})
    assert model_key({"id": a.id}, params) != model_key({"id": other_tower.id}, params)
    assert region_key("p", a.id, "img", "mask", "d") != region_key("p", other_tower.id, "img", "mask", "d")


def test_prototypes_and_image_states_are_keyed_by_the_model():
    a = load_clip("maskinv-test-tiny", "none", "cpu", seed=0)
    b = load_clip("maskinv-test-tiny", "none", "cpu", seed=1)  # same tower and width, other weights
    scorer = LabelScorer(a)
    protos_a = scorer.prototypes(["cat", "dog"])
    scorer.clip = b  # a scorer switched to another model never answers from the first one's cache
    protos_b = scorer.prototypes(["cat", "dog"])
    assert protos_a.shape == protos_b.shape and not torch.allclose(protos_a, protos_b)
    templates = tuple(DEFAULT_TEMPLATES)
    assert (a.id, ("cat", "dog"), templates) in scorer.cache and (b.id, ("cat", "dog"), templates) in scorer.cache
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    eng_a, eng_b = MaskInversionEngine(a), MaskInversionEngine(b)
    state_a, _, digest, _ = eng_a.image_state(image, 32)
    state_b, hit, *_ = eng_b.image_state(image, 32)
    assert not hit and not torch.allclose(state_a.global_embedding, state_b.global_embedding)
    assert (digest, a.id, 32) in eng_a.cache and (digest, b.id, 32) in eng_b.cache
