"""ClipCap captions for region embeddings: a mapping network turns a CLIP embedding into a GPT-2 prefix.

A captioner is trained on CLIP *image* embeddings (``training/train_clipcap.py``); at inference the region's
LET takes the place of the image embedding (MaskInversion's localized captioning). Decoding (greedy or beam
search) is batched over all regions of an image.

A captioner is a directory (``save_clipcap`` writes it)::

    clipcap.json          the configuration below
    mapping.safetensors   the mapping network's weights
    gpt2/                 GPT-2 (transformers ``save_pretrained``: config.json + model.safetensors)
    tokenizer/            its tokenizer (transformers ``save_pretrained``)

``clipcap.json`` may name a hub id instead of the ``gpt2``/``tokenizer`` sub-directories (e.g. ``"gpt2"``
for OpenAI's GPT-2 when it was kept frozen). The captioner itself is loaded from a local directory, the
path of its ``clipcap.json``, or a Hugging Face hub id (downloaded with ``huggingface_hub``; offline sites
mount the directory and give its path).

Environment (defaults in brackets), read by ``worker.settings.CaptionerSettings.from_env``:
    MASKINV_CAPTIONER              captioner directory, its clipcap.json, or a hub id; "" = no captioner
                                   (the caller falls back to retrieval captions) [""]
    MASKINV_CAPTION_DECODING       "beam" or "greedy" ["beam"]
    MASKINV_CAPTION_BEAM           beam width for beam search [3]
    MASKINV_CAPTION_MAX_TOKENS     most tokens per caption, end-of-text included [20]
    MASKINV_CAPTION_LENGTH_PENALTY beam hypotheses are ranked by log-prob / length**penalty [1.0]
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from worker.settings import CaptionerSettings
from worker.text.captions import RetrievalCaptioner, with_article
from worker.text.label_agreement import first_agreeing

log = logging.getLogger(__name__)

CONFIG_NAME = "clipcap.json"
MAPPING_NAME = "mapping.safetensors"
FORMAT = "maskinv-clipcap"
FORMAT_VERSION = 1
MAPPINGS = ("mlp", "transformer")
DECODINGS = ("beam", "greedy")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CaptionerError(ValueError):
    """A captioner cannot be loaded or configured (missing files, bad configuration, wrong CLIP)."""


# ---------------------------------------------------------------------------------------------- config
@dataclass
class ClipCapConfig:
    """Architecture of a ClipCap captioner (stored as ``clipcap.json``)."""

    clip_dim: int  # D: size of the CLIP embeddings fed in
    prefix_length: int = 10  # L: GPT-2 prefix tokens made from one embedding
    mapping: str = "mlp"  # "mlp" (Linear-Tanh-Linear) or "transformer"
    clip_length: int = 10  # transformer mapping: tokens the embedding is first projected to
    mapping_layers: int = 8  # transformer mapping: encoder layers
    mapping_heads: int = 8  # transformer mapping: attention heads (must divide GPT-2's width)
    normalize_input: bool = True  # L2-normalise embeddings before the mapping (LETs are unnormalised)
    gpt2: str = "gpt2"  # sub-directory with GPT-2, or a hub id / local path of a GPT-2 checkpoint
    tokenizer: str = "tokenizer"  # sub-directory with the tokenizer, or a hub id / local path
    clip_model: dict[str, str] = field(default_factory=dict)  # CLIP it was trained for (name, pretrained)
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained (informational)

    def validate(self) -> None:
        if self.mapping not in MAPPINGS:
            raise CaptionerError(f"clipcap mapping must be one of {MAPPINGS}, got {self.mapping!r}")
        for name in ("clip_dim", "prefix_length", "clip_length", "mapping_layers", "mapping_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CaptionerError(f"clipcap {name} must be a positive integer, got {value!r}")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any, where: str = CONFIG_NAME) -> "ClipCapConfig":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CaptionerError(f"{where} is not a {FORMAT} configuration (missing \"format\": \"{FORMAT}\")")
        if data.get("version") != FORMAT_VERSION:
            raise CaptionerError(f"{where} has format version {data.get('version')!r}; this code reads "
                                 f"version {FORMAT_VERSION}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format", "version"})
        if unknown:
            raise CaptionerError(f"{where} has unknown field(s) {unknown}")
        if "clip_dim" not in data:
            raise CaptionerError(f"{where} lacks clip_dim")
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.validate()
        return cfg


# ---------------------------------------------------------------------------------------------- model
class MLPMapping(nn.Module):
    """Embedding ``[N, D]`` -> prefix ``[N, L, E]`` through Linear(D, L·E/2) - Tanh - Linear(L·E/2, L·E)."""

    def __init__(self, clip_dim: int, embed_dim: int, prefix_length: int):
        super().__init__()
        hidden = max(1, embed_dim * prefix_length // 2)
        self.prefix_length, self.embed_dim = prefix_length, embed_dim
        self.net = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Tanh(), nn.Linear(hidden, embed_dim * prefix_length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.prefix_length, self.embed_dim)


class TransformerMapping(nn.Module):
    """Embedding ``[N, D]`` -> prefix ``[N, L, E]``.

    The embedding is projected to ``clip_length`` tokens, ``L`` learnt constant tokens are appended, a
    transformer encoder mixes them and its outputs at the constant tokens' positions are the prefix.
    """

    def __init__(self, clip_dim: int, embed_dim: int, prefix_length: int, clip_length: int, layers: int,
                 heads: int):
        super().__init__()
        if embed_dim % heads:
            raise CaptionerError(f"mapping_heads={heads} does not divide GPT-2's width {embed_dim}")
        self.clip_length, self.embed_dim = clip_length, embed_dim
        self.linear = nn.Linear(clip_dim, clip_length * embed_dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, embed_dim))
        layer = nn.TransformerEncoderLayer(embed_dim, heads, dim_feedforward=4 * embed_dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x).view(x.shape[0], self.clip_length, self.embed_dim)
        h = torch.cat([h, self.prefix_const[None].expand(x.shape[0], -1, -1)], dim=1)
        return self.transformer(h)[:, self.clip_length:]


def build_mapping(cfg: ClipCapConfig, embed_dim: int) -> nn.Module:
    """The mapping network of ``cfg`` for a GPT-2 of width ``embed_dim``."""
    cfg.validate()
    if cfg.mapping == "mlp":
        return MLPMapping(cfg.clip_dim, embed_dim, cfg.prefix_length)
    return TransformerMapping(cfg.clip_dim, embed_dim, cfg.prefix_length, cfg.clip_length, cfg.mapping_layers,
                              cfg.mapping_heads)


class ClipCapModel(nn.Module):
    """Mapping network + GPT-2 (``transformers.GPT2LMHeadModel``)."""

    lm: Any  # transformers.GPT2LMHeadModel (its config, cache and generation API are untyped)

    def __init__(self, cfg: ClipCapConfig, lm: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.lm = lm
        self.embed_dim = int(self.lm.config.n_embd)
        self.mapping = build_mapping(cfg, self.embed_dim)

    @property
    def max_positions(self) -> int:
        return int(self.lm.config.n_positions)

    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """GPT-2 prefix ``[N, L, E]`` of CLIP embeddings ``[N, D]``."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.cfg.clip_dim:
            raise ValueError(f"embeddings must be [N, {self.cfg.clip_dim}], got {list(embeddings.shape)}")
        x = embeddings.to(self.mapping_dtype)
        if self.cfg.normalize_input:
            x = F.normalize(x, dim=-1)
        return self.mapping(x)

    @property
    def mapping_dtype(self) -> torch.dtype:
        return next(self.mapping.parameters()).dtype

    def loss(self, embeddings: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of captions ``tokens`` ``[N, T]`` (right-padded; ``lengths`` ``[N]``
        valid tokens each, end-of-text included) given the prefixes of ``embeddings`` ``[N, D]``."""
        prefix = self.prefix(embeddings)
        n, t = tokens.shape
        length = prefix.shape[1] + t
        if length > self.max_positions:
            raise ValueError(f"prefix + caption = {length} tokens exceed GPT-2's {self.max_positions} positions")
        inputs = torch.cat([prefix, self.lm.get_input_embeddings()(tokens)], dim=1)
        logits = self.lm(inputs_embeds=inputs).logits[:, prefix.shape[1] - 1:-1]  # [N, T, V] predicts tokens
        valid = torch.arange(t, device=tokens.device)[None] < lengths[:, None]
        return F.cross_entropy(logits[valid].float(), tokens[valid])

    @torch.no_grad()
    def beam_search(self, embeddings: torch.Tensor, eos_id: int, beam_size: int = 3,
                    max_tokens: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Beam search over all N embeddings ``[N, D]`` at once (``beam_size`` = 1 is greedy decoding).

        The prefix goes through GPT-2 once, then one token per step with the key/value cache; hypotheses are
        extended by their summed log-probability (an ended one only continues with end-of-text, at no cost) until
        all have ended or after ``max_tokens``. Returns the B = min(beam_size, vocabulary) hypotheses per
        embedding: token ids ``[N, B, T]`` (end-of-text after the end), summed log-probabilities ``[N, B]`` and
        lengths ``[N, B]`` (tokens up to and with end-of-text).
        """
        if beam_size < 1 or max_tokens < 1:
            raise ValueError(f"beam_size and max_tokens must be >= 1, got {beam_size} and {max_tokens}")
        n = embeddings.shape[0]
        prefix = self.prefix(embeddings.to(self.lm.device))
        if prefix.shape[1] + max_tokens > self.max_positions:
            raise ValueError(f"prefix ({prefix.shape[1]}) + max_tokens ({max_tokens}) exceed GPT-2's "
                             f"{self.max_positions} positions")
        wte = self.lm.get_input_embeddings()
        out = self.lm(inputs_embeds=prefix.to(wte.weight.dtype), use_cache=True)
        past = out.past_key_values
        logp = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [N, V]
        vocab = logp.shape[-1]
        b = min(beam_size, vocab)
        scores, tok = logp.topk(b, dim=-1)  # [N, B]
        seqs = tok[..., None]  # [N, B, t]
        finished = tok == eos_id
        lengths = torch.ones_like(tok)
        past.batch_repeat_interleave(b)
        ended_row = torch.full((vocab,), float("-inf"), device=logp.device)
        ended_row[eos_id] = 0.0  # an ended hypothesis only continues with end-of-text, at no cost
        rows = torch.arange(n, device=logp.device)[:, None] * b
        for _ in range(max_tokens - 1):
            if bool(finished.all()):
                break
            out = self.lm(inputs_embeds=wte(seqs[..., -1].reshape(n * b, 1)), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = F.log_softmax(out.logits[:, -1].float(), dim=-1).view(n, b, vocab)
            logp = torch.where(finished[..., None], ended_row, logp)
            cand = (scores[..., None] + logp).view(n, b * vocab)
            scores, idx = cand.topk(b, dim=-1)
            beam, tok = idx // vocab, idx % vocab
            seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, seqs.shape[-1])), tok[..., None]], -1)
            was_finished = finished.gather(1, beam)
            lengths = lengths.gather(1, beam) + (~was_finished).long()
            finished = was_finished | (tok == eos_id)
            past.reorder_cache((rows + beam).view(-1))
        return seqs, scores, lengths

    @torch.no_grad()
    def generate_candidates(self, embeddings: torch.Tensor, eos_id: int, beam_size: int = 3, max_tokens: int = 20,
                            length_penalty: float = 1.0) -> list[list[list[int]]]:
        """Token ids of every beam hypothesis per embedding ``[N, D]`` (end-of-text stripped), best first by
        ``log-prob / length**length_penalty`` (ties keep beam order)."""
        if embeddings.shape[0] == 0:
            return []
        seqs, scores, lengths = self.beam_search(embeddings, eos_id, beam_size, max_tokens)
        ranked = scores / lengths.float().pow(length_penalty)  # [N, B]
        order = ranked.sort(dim=-1, descending=True, stable=True).indices  # [N, B]
        best_first = seqs.gather(1, order[..., None].expand(-1, -1, seqs.shape[-1])).tolist()  # [N, B, T]
        return [[ids[:ids.index(eos_id)] if eos_id in ids else ids for ids in hyps] for hyps in best_first]

    @torch.no_grad()
    def generate(self, embeddings: torch.Tensor, eos_id: int, beam_size: int = 3, max_tokens: int = 20,
                 length_penalty: float = 1.0) -> list[list[int]]:
        """Token ids of one caption per embedding ``[N, D]`` (end-of-text stripped): each embedding's best beam
        hypothesis by ``log-prob / length**length_penalty`` (:meth:`beam_search`)."""
        if beam_size < 1 or max_tokens < 1:
            raise ValueError(f"beam_size and max_tokens must be >= 1, got {beam_size} and {max_tokens}")
        return [hyps[0] for hyps in self.generate_candidates(embeddings, eos_id, beam_size, max_tokens,
                                                              length_penalty)]


# ---------------------------------------------------------------------------------------------- files
def _resolve_part(root: Path, ref: str, what: str) -> str:
    """A sub-directory of the captioner, else a local path, else a hub id."""
    if not isinstance(ref, str) or not ref.strip():
        raise CaptionerError(f"clipcap.json field {what!r} must name a sub-directory, path or hub id")
    local = root / ref
    if local.is_dir():
        return str(local)
    if Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser())
    if _HUB_ID.match(ref):
        return ref  # transformers resolves (and caches) hub ids; HF_HUB_OFFLINE=1 uses the cache only
    raise CaptionerError(f"{what} {ref!r} of {root} is neither a sub-directory, a local directory nor a hub id")


def resolve_captioner_dir(source: str | Path) -> Path:
    """The local directory of a captioner given as a directory, its clipcap.json, or a hub id."""
    text = str(source).strip()
    if not text:
        raise CaptionerError("no captioner given (empty path)")
    path = Path(text).expanduser()
    if path.is_file():
        if path.name != CONFIG_NAME:
            raise CaptionerError(f"captioner file {path} is not a {CONFIG_NAME}; give the captioner's directory "
                                 f"or its {CONFIG_NAME}")
        path = path.parent
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise CaptionerError(f"captioner directory {path} has no {CONFIG_NAME} (not a ClipCap captioner "
                                 f"written by worker.text.clipcap.save_clipcap)")
        return path
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or not _HUB_ID.match(text):
        raise CaptionerError(f"captioner {text!r} does not exist (not a local path; not a hub id either)")
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(text))
    except Exception as exc:  # network, unknown repo, offline without a cached copy
        raise CaptionerError(f"captioner {text!r} is not a local path and could not be fetched from the hub "
                             f"({type(exc).__name__}: {exc}); offline sites: mount the captioner directory and "
                             f"give its path") from exc
    if not (local / CONFIG_NAME).is_file():
        raise CaptionerError(f"hub repository {text!r} has no {CONFIG_NAME}: not a ClipCap captioner of this project")
    return local


@dataclass
class ClipCap:
    """A loaded captioner: model, tokenizer and where it came from."""

    model: ClipCapModel
    tokenizer: Any  # transformers tokenizer
    source: str

    @property
    def cfg(self) -> ClipCapConfig:
        return self.model.cfg

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def save_clipcap(cap: ClipCap | tuple[ClipCapModel, Any], path: str | Path) -> Path:
    """Write a captioner directory (clipcap.json, mapping.safetensors, gpt2/, tokenizer/); returns it."""
    from safetensors.torch import save_file

    model, tokenizer = (cap.model, cap.tokenizer) if isinstance(cap, ClipCap) else cap
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ClipCapConfig(**{**asdict(model.cfg), "gpt2": "gpt2", "tokenizer": "tokenizer"})
    (out / CONFIG_NAME).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.mapping.state_dict().items()}
    save_file(state, str(out / MAPPING_NAME))
    model.lm.save_pretrained(str(out / "gpt2"))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return out


def load_clipcap(source: str | Path, device: str | torch.device | None = None) -> ClipCap:
    """Load a captioner (directory, its clipcap.json, or a hub id) in eval mode on ``device`` [cpu]."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GPT2LMHeadModel

    root = resolve_captioner_dir(source)
    try:
        data = json.loads((root / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise CaptionerError(f"{root / CONFIG_NAME} is not valid JSON: {exc}") from exc
    cfg = ClipCapConfig.from_json(data, str(root / CONFIG_NAME))
    if not (root / MAPPING_NAME).is_file():
        raise CaptionerError(f"captioner {root} lacks its mapping weights {MAPPING_NAME}")
    gpt2_ref = _resolve_part(root, cfg.gpt2, "gpt2")
    tok_ref = _resolve_part(root, cfg.tokenizer, "tokenizer")
    try:
        lm = GPT2LMHeadModel.from_pretrained(gpt2_ref)
    except Exception as exc:
        raise CaptionerError(f"cannot load GPT-2 of captioner {root} from {gpt2_ref!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_ref)
    except Exception as exc:
        raise CaptionerError(f"cannot load the tokenizer of captioner {root} from {tok_ref!r}: {exc}") from exc
    if tokenizer.eos_token_id is None:
        raise CaptionerError(f"the tokenizer of captioner {root} has no end-of-text token")
    if len(tokenizer) > lm.config.vocab_size:
        raise CaptionerError(f"tokenizer of {root} has {len(tokenizer)} tokens but GPT-2 only "
                             f"{lm.config.vocab_size} embeddings")
    model = ClipCapModel(cfg, lm)
    try:
        model.mapping.load_state_dict(load_file(str(root / MAPPING_NAME)))
    except RuntimeError as exc:
        raise CaptionerError(f"mapping weights of {root} do not fit clipcap.json ({cfg.mapping}, prefix "
                             f"{cfg.prefix_length}, clip_dim {cfg.clip_dim}, GPT-2 width {model.embed_dim}): "
                             f"{exc}") from exc
    model.eval().requires_grad_(False)
    model.to(torch.device(device) if device is not None else torch.device("cpu"))
    log.info("captioner loaded from %s: %s mapping, prefix %d, GPT-2 %d layers × %d, vocabulary %d", root,
             cfg.mapping, cfg.prefix_length, lm.config.n_layer, lm.config.n_embd, len(tokenizer))
    return ClipCap(model=model, tokenizer=tokenizer, source=str(source))


# ---------------------------------------------------------------------------------------------- captioner
class ClipCapCaptioner:
    """Captions region embeddings with a ClipCap model (mode ``"clipcap"``; same interface as
    ``worker.text.captions.RetrievalCaptioner``).

    With ``agree_with_labels`` (default) a region's caption is the best beam hypothesis that names the region's
    label (``worker.text.label_agreement``); when none does, ``fallback``'s caption of the region for that label
    (a retrieval caption, which always names it), or the label after an article without a fallback.
    """

    mode = "clipcap"

    def __init__(self, cap: ClipCap, decoding: str = "beam", beam_size: int = 3, max_tokens: int = 20,
                 length_penalty: float = 1.0, batch_size: int = 64, agree_with_labels: bool = True,
                 fallback: RetrievalCaptioner | None = None):
        if decoding not in DECODINGS:
            raise CaptionerError(f"caption decoding must be one of {DECODINGS}, got {decoding!r}")
        if beam_size < 1 or max_tokens < 1 or batch_size < 1:
            raise CaptionerError(f"beam size, max tokens and batch size must be >= 1, got {beam_size}, "
                                 f"{max_tokens}, {batch_size}")
        room = cap.model.max_positions - cap.cfg.prefix_length
        if max_tokens > room:
            raise CaptionerError(f"max tokens {max_tokens} exceed the {room} positions GPT-2 has after the "
                                 f"{cap.cfg.prefix_length}-token prefix")
        self.cap = cap
        self.beam_size = 1 if decoding == "greedy" else beam_size
        self.decoding = decoding
        self.max_tokens = max_tokens
        self.length_penalty = length_penalty
        self.batch_size = batch_size
        self.agree_with_labels = agree_with_labels
        self.fallback = fallback
        self.fallbacks = 0  # captions that came from the fallback because no hypothesis named the label

    @property
    def clip_dim(self) -> int:
        return self.cap.cfg.clip_dim

    def _check(self, embeddings: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.clip_dim:
            raise ValueError(f"embeddings must be [N, {self.clip_dim}], got {list(embeddings.shape)}")

    def caption_ids(self, embeddings: torch.Tensor) -> list[list[int]]:
        """Token ids of one caption per embedding ``[N, D]`` (the best beam hypothesis; labels not used)."""
        return [hyps[0] for hyps in self.candidate_ids(embeddings)]

    def candidate_ids(self, embeddings: torch.Tensor) -> list[list[list[int]]]:
        """Token ids of every beam hypothesis per embedding ``[N, D]``, best first."""
        self._check(embeddings)
        out: list[list[list[int]]] = []
        for i in range(0, embeddings.shape[0], self.batch_size):
            out += self.cap.model.generate_candidates(embeddings[i:i + self.batch_size], self.cap.eos_id,
                                                      self.beam_size, self.max_tokens, self.length_penalty)
        return out

    @torch.no_grad()
    def caption(self, embeddings: torch.Tensor, labels: Sequence[str] = ()) -> list[str]:
        """One caption per embedding ``[N, D]`` (LETs or image embeddings); ``labels[i]`` is region i's label
        (the one the annotator sees; "" or no labels: no constraint)."""
        candidates = [[self.cap.decode(ids) for ids in hyps] for hyps in self.candidate_ids(embeddings)]
        if not self.agree_with_labels or not any(labels):
            return [hyps[0] for hyps in candidates]
        if len(labels) != len(candidates):
            raise ValueError(f"{len(candidates)} embeddings but {len(labels)} labels")
        chosen = [first_agreeing(hyps, label) for hyps, label in zip(candidates, labels)]
        missing = [i for i, c in enumerate(chosen) if c is None]
        if missing:
            self.fallbacks += len(missing)
            lost = [labels[i] for i in missing]
            replaced = (self.fallback.caption(embeddings[missing], lost) if self.fallback is not None
                        else [with_article(label) for label in lost])
            for i, text in zip(missing, replaced):
                chosen[i] = text
        return [c if c is not None else hyps[0] for c, hyps in zip(chosen, candidates)]


def load_captioner(scorer: Any, settings: CaptionerSettings) -> ClipCapCaptioner | None:
    """The captioner ``settings`` name for the worker's CLIP (``scorer.clip``), or None (retrieval captions).

    Raises :class:`CaptionerError` when the captioner cannot be loaded, the decoding settings are invalid or its
    embedding size differs from the CLIP model's; warns when it was trained for another CLIP model.
    """
    source = settings.source
    if not source:
        return None
    clip = scorer.clip
    cap = load_clipcap(source, device=clip.device)
    if cap.cfg.clip_dim != clip.embed_dim:
        raise CaptionerError(f"captioner {source} takes {cap.cfg.clip_dim}-d embeddings but CLIP model "
                             f"{clip.name} makes {clip.embed_dim}-d ones (MASKINV_CAPTIONER vs MASKINV_MODEL)")
    trained_for = cap.cfg.clip_model.get("name")
    if trained_for and trained_for != clip.name:
        log.warning("captioner %s was trained on CLIP %s but the worker runs %s: captions will be poor", source,
                    trained_for, clip.name)
    return ClipCapCaptioner(cap, decoding=settings.decoding, beam_size=settings.beam_size,
                            max_tokens=settings.max_tokens, length_penalty=settings.length_penalty,
                            fallback=RetrievalCaptioner(scorer))
