"""Tiny random models saved to disk, loadable through the `full` profile's code path.

No network is used: every model is built from a config and a small hand-written
vocabulary, saved with the library's own `save_pretrained` / `save`, and then
loaded by the production encoders exactly like downloaded weights would be.

To run the `full` profile end to end with these models::

    from tests.tiny_models import tiny_full_spec
    from mvpp.memory_bank.encoders import load_encoders

    spec = tiny_full_spec(tmp_path)      # EncoderSpec(profile="full", ...) with local paths
    encoders = load_encoders(spec, device="cpu")

which is `EncoderSpec.from_profile("full", text_model=..., captioner_model=...,
frame_model=..., frame_pretrained=...)` with the folders written by the
`make_tiny_*` functions below. Dimensions: text 32, tokens 32, frames 16.
"""

from __future__ import annotations

import json
from pathlib import Path

from mvpp.memory_bank.encoders.profiles import EncoderSpec

__all__ = [
    "TINY_FRAME_DIM",
    "TINY_TEXT_DIM",
    "TINY_VOCAB",
    "make_tiny_blip",
    "make_tiny_open_clip",
    "make_tiny_open_clip_checkpoint",
    "make_tiny_sentence_model",
    "make_tiny_tokenizer",
    "seeded_linear",
    "tiny_transformer",
    "tiny_full_spec",
]

TINY_TEXT_DIM = 32
TINY_FRAME_DIM = 16

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS_TEXT = (
    "a an the of on in with and is are at to dog dogs cat cats man woman people person "
    "child car cars street road beach sea sky water grass tree trees park city house room "
    "kitchen food plate table ball game bird birds bike riding running playing sitting "
    "standing walking eating cooking red blue green white black small big video music dance "
    "funny cute day night sunset ."
)
TINY_VOCAB: tuple[str, ...] = tuple(_SPECIAL + _WORDS_TEXT.split() + ["##s", "##ing", "##ed"])


def seeded_linear(k: int, n: int, seed: int = 0, bias: bool = True):
    """A `torch.nn.Linear(k, n)` with weights drawn from `seed`."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias)


def tiny_transformer(sentence_model: Path):
    """The bare transformers model saved beside a `make_tiny_sentence_model` folder."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(sentence_model.parent / f"{sentence_model.name}-hf"))


def make_tiny_tokenizer(path: Path | str | None = None):
    """A lower-casing BERT WordPiece tokenizer over `TINY_VOCAB` (also written to vocab.txt)."""
    from transformers import BertTokenizer

    vocab = {token: i for i, token in enumerate(TINY_VOCAB)}
    if path is not None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def make_tiny_sentence_model(path: Path | str, architecture: str = "bert", pooling: str = "mean") -> Path:
    """A 1-layer BERT (hidden 32; or DistilBERT with `architecture="distilbert"`) with mean
    pooling (or `pooling="cls"`, as UAE pools), saved as a sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    path = Path(path)
    hf_dir = path.parent / f"{path.name}-hf"
    torch.manual_seed(0)
    shared = {"vocab_size": len(TINY_VOCAB), "max_position_embeddings": 64, "pad_token_id": 0}
    if architecture == "distilbert":
        model = DistilBertModel(DistilBertConfig(dim=TINY_TEXT_DIM, n_layers=1, n_heads=2, hidden_dim=64, **shared))
    else:
        model = BertModel(BertConfig(hidden_size=TINY_TEXT_DIM, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, **shared))
    model.save_pretrained(hf_dir)
    make_tiny_tokenizer(hf_dir).save_pretrained(hf_dir)

    transformer = Transformer(str(hf_dir), max_seq_length=48)
    pooled = Pooling(TINY_TEXT_DIM, pooling_mode=pooling)
    SentenceTransformer(modules=[transformer, pooled, Normalize()], device="cpu").save(str(path))
    return path


def make_tiny_blip(path: Path | str) -> Path:
    """A random BLIP captioner (ViT 32px / 1 layer, text decoder 1 layer) plus its processor."""
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(path)
    torch.manual_seed(0)
    vision_width = 32
    config = BlipConfig(
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "vocab_size": len(TINY_VOCAB),
            "hidden_size": 32,
            "encoder_hidden_size": vision_width,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "pad_token_id": tokenizer.pad_token_id,
            # Real BLIP starts captions with a dedicated [DEC] token; [CLS] plays
            # that role here, and [SEP] ends the caption.
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "sep_token_id": tokenizer.sep_token_id,
        },
        projection_dim=16,
    )
    BlipForConditionalGeneration(config).save_pretrained(path)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def _tiny_open_clip_cfg() -> dict:
    return {
        "embed_dim": TINY_FRAME_DIM,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }


def make_tiny_open_clip(path: Path | str) -> tuple[str, str | None]:
    """A random open_clip ViT (32px, 1 layer, embed 16) saved as a local open_clip folder.

    The folder holds `open_clip_config.json` and `open_clip_model.safetensors`, the
    layout open_clip loads via "local-dir:". Returns `(frame_model, frame_pretrained)`
    for `EncoderSpec` / `OpenClipFrameEncoder`: the folder path and None (the
    weights are found inside the folder).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": _tiny_open_clip_cfg(),
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
    }
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    torch.manual_seed(0)
    # Built through open_clip's own "local-dir:" code path; no weights yet, so random.
    model = open_clip.create_model(f"local-dir:{path}", pretrained_text=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    return str(path), None


def make_tiny_open_clip_checkpoint(path: Path | str) -> tuple[str, str]:
    """The same tiny model as a bare model config json plus a checkpoint file.

    Returns `(config_json_path, checkpoint_path)`; open_clip registers the config
    under the json's file stem.
    """
    import open_clip
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg_path = path / "mvpp-tiny-vit.json"
    cfg_path.write_text(json.dumps(_tiny_open_clip_cfg(), indent=2), encoding="utf-8")
    torch.manual_seed(1)
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model("mvpp-tiny-vit", pretrained_text=False)
    ckpt = path / "mvpp-tiny-vit.pt"
    torch.save(model.state_dict(), ckpt)
    return str(cfg_path), str(ckpt)


TINY_AUDIO_DIM = 32


def make_tiny_ast(path: Path | str) -> Path:
    """A random Audio Spectrogram Transformer (hidden size TINY_AUDIO_DIM) with its
    feature extractor, saved as `save_pretrained` writes them."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = ASTConfig(
        hidden_size=TINY_AUDIO_DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_length=256, num_mel_bins=32, frequency_stride=10, time_stride=10,
    )
    ASTModel(config).save_pretrained(path)
    ASTFeatureExtractor(num_mel_bins=32, max_length=256).save_pretrained(path)
    return path


def tiny_full_spec(tmp_path: Path | str) -> EncoderSpec:
    """The `full` profile pointed at tiny random models written under `tmp_path`."""
    root = Path(tmp_path)
    frame_model, frame_pretrained = make_tiny_open_clip(root / "tiny-open-clip")
    return EncoderSpec.from_profile(
        "full",
        text_model=str(make_tiny_sentence_model(root / "tiny-sentence")),
        captioner_model=str(make_tiny_blip(root / "tiny-blip")),
        frame_model=frame_model,
        frame_pretrained=frame_pretrained,
        audio_model=str(make_tiny_ast(root / "tiny-ast")),
    )
