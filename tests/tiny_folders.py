"""Tiny model folders as a user brings them: diffusers pipelines saved with
``save_pretrained`` (text encoders and tokenizers made here, no downloads), a bare diffusers
model folder, and ``.py`` entry points.

A helper module, not a test module. The networks come from :mod:`tiny_pipelines` (random
weights, fixed seeds); the text parts are built here:

* CLIP tokenizers from a 30-word vocabulary (``vocab.json`` + ``merges.txt`` written to a
  temporary folder), 8 tokens; ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` of one
  layer;
* a T5 tokenizer (``tokenizers`` Unigram model over the same words) and a one-layer
  ``T5EncoderModel`` for Flux (SD3 is saved without its optional T5).

Each builder writes its folder (once per path) and returns it.
"""

from __future__ import annotations

import json
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)

from tiny_pipelines import (
    POOLED_DIM,
    TEXT_DIM,
    TEXT_TOKENS,
    _flux_components,
    _sd3_components,
    _sd_components,
    _unet2d,
)

WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "digit",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "small",
    "big",
    "bright",
    "dark",
    "painting",
    "drawing",
    "sketch",
    "image",
    "picture",
]


def clip_tokenizer() -> Any:
    """A CLIP tokenizer over :data:`WORDS` (whole words; unknown words by letters)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for word in WORDS:
        vocab.setdefault(word + "</w>", len(vocab))
    folder = Path(tempfile.mkdtemp(prefix="diffsolve-clip-tokenizer-"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TEXT_TOKENS
    )


def _clip_config(hidden: int, projection: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(WORDS) + 2 + 52,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def clip_text_encoder(seed: int, hidden: int, projection: bool = False) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(_clip_config(hidden, hidden)).eval()


def t5_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=TEXT_TOKENS,
    )


def t5_encoder(seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(WORDS) + 3,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=2 * TEXT_DIM,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config).eval()


def _save(pipe: Any, folder: Path) -> Path:
    if not (folder / "model_index.json").is_file():
        pipe.save_pretrained(folder)
    return folder


def ddpm_folder(folder: Path, scheduler: dict[str, Any] | None = None) -> Path:
    """A ``DDPMPipeline`` folder: the 3x8x8 ``UNet2DModel`` (attention) of
    :mod:`tiny_pipelines`, ``DDPMScheduler(**scheduler)``."""
    return _save(
        DDPMPipeline(unet=_unet2d(0), scheduler=DDPMScheduler(**(scheduler or {}))), folder
    )


def unet_folder(folder: Path) -> Path:
    """A bare ``UNet2DModel`` folder with ``scheduler_config.json`` beside the weights."""
    if not (folder / "config.json").is_file():
        _unet2d(2).save_pretrained(folder)
        DDPMScheduler(
            beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
        ).save_config(folder)
    return folder


def sd_folder(folder: Path) -> Path:
    """A ``StableDiffusionPipeline`` folder with a CLIP tokenizer and text encoder
    (16x16 images, 4x8x8 latents, SD 1.5's scheduler config)."""
    components = _sd_components()
    components.update(tokenizer=clip_tokenizer(), text_encoder=clip_text_encoder(12, TEXT_DIM))
    return _save(StableDiffusionPipeline(**components), folder)


def sd3_folder(folder: Path) -> Path:
    """A ``StableDiffusion3Pipeline`` folder: two CLIP encoders with projections (16 wide
    each: 32 = the transformer's text and pooled widths), no T5; shift 3."""
    components = _sd3_components()
    half = TEXT_DIM // 2
    assert 2 * half == POOLED_DIM
    components.update(
        tokenizer=clip_tokenizer(),
        text_encoder=clip_text_encoder(22, half, projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_2=clip_text_encoder(23, half, projection=True),
    )
    return _save(StableDiffusion3Pipeline(**components), folder)


def flux_folder(folder: Path) -> Path:
    """A ``FluxPipeline`` folder: CLIP (pooled, 32) and T5 (32) encoders, FLUX.1-dev's
    scheduler config (dynamic shifting), guidance embedding."""
    components = _flux_components()
    components.update(
        tokenizer=clip_tokenizer(),
        text_encoder=clip_text_encoder(32, POOLED_DIM),
        tokenizer_2=t5_tokenizer(),
        text_encoder_2=t5_encoder(33),
    )
    return _save(FluxPipeline(**components), folder)


#: A flow model trained with ``s = 0`` as noise (time reversed against diffsolve's), as a
#: user wraps it: exact for Gaussian data N(mu, diag(var)), so its samples are known.
REVERSED_FLOW = '''
"""An exact rectified-flow model of N(mu, diag(var)) data in the convention x_s = (1 - s) eps
+ s x0 (s = 0: noise) with velocity v = x0 - eps, wrapped for diffsolve."""
import torch
from torch import nn

import diffsolve

MU = torch.linspace(-0.5, 0.5, 16).reshape(1, 4, 4)
VAR = torch.linspace(0.05, 0.5, 16).reshape(1, 4, 4)


class ReversedFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.mu = nn.Parameter(MU.clone(), requires_grad=False)
        self.var = nn.Parameter(VAR.clone(), requires_grad=False)

    def forward(self, x, s):
        s = s.to(x.dtype).reshape(-1, 1, 1, 1)
        mean, var = s * self.mu, s * s * self.var + (1 - s) ** 2  # x_s = s x0 + (1 - s) eps
        x0 = self.mu + s * self.var * (x - mean) / var            # E[x0 | x_s]
        eps = (x - s * x0) / (1 - s).clamp_min(1e-6)
        return x0 - eps                                            # v = dx/ds


class Negated(nn.Module):
    """diffsolve's velocity is u = eps - x0 = -v."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return -self.net(x, t)


def load():
    return diffsolve.ModelWrapper(
        Negated(ReversedFlow()),
        diffsolve.RectifiedFlow(),
        prediction="flow",
        time_input=lambda t: 1 - t,
        data_shape=(1, 4, 4),
    )
'''


def reversed_flow_file(folder: Path) -> str:
    """A ``.py`` entry point of :data:`REVERSED_FLOW`; returns ``"<file>:load"``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reversed_flow.py"
    if not path.is_file():
        path.write_text(textwrap.dedent(REVERSED_FLOW))
    return f"{path}:load"
