"""A run directory: what training leaves behind, and how it is read back.

RUN_DIR/
  model.safetensors   weights (no pickles anywhere)
  config.json         model + training config, target names and normalisation,
                      interval calibration, metadata features (their training
                      statistics and vocabularies), the title word vocabulary,
                      the bank's manifest and location
  splits.json         item ids of train / val / test
  metrics.json        per-split, per-target metrics and the epoch history
  neighbour-index/    HNSW indexes of the neighbour search's memories, one folder per
                      memory named by its digest (retriever.ann); only for runs whose
                      neighbours come from an index (TrainConfig.neighbour_index)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mvpp.config import DEFAULT_COLLECTION, BankLocation
from mvpp.memory_bank.schema import Manifest, json_safe
from mvpp.predictor.boosting import GbdtMember
from mvpp.predictor.config import ModelConfig
from mvpp.predictor.dataset import TargetNorm
from mvpp.predictor.features import MetaFeaturizer
from mvpp.predictor.lexicon import Lexicon
from mvpp.predictor.model import PopularityModel
from mvpp.predictor.training import TrainConfig, TrainResult
from mvpp.retriever.snapshot import BankSnapshot

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SPLITS = "splits.json"
METRICS = "metrics.json"
INDEX_DIR = "neighbour-index"
RUN_FORMAT = 1


class RunError(ValueError):
    """A run directory is missing, incomplete or incompatible."""


def _load_gbdt(path: Path, members: dict[str, Any]) -> GbdtMember | None:
    """The run's boosted member, its files checked against the config's fingerprints."""
    files = [name for bag in GbdtMember.file_lists(members.get("gbdt_files", [])) for name in bag]
    if not files:
        return None
    for name in files:
        if not (path / name).exists():
            raise RunError(f"{path / name} is missing: train the run again")
        if members.get("gbdt_sha256", {}).get(name) != _sha256(path / name):
            raise RunError(f"{path / name} is not the file {path / CONFIG} was written with: train the run again")
    try:
        return GbdtMember.load(path, members["gbdt_files"], members.get("gbdt_categorical", []))
    except Exception as exc:  # LightGBM raises its own error type for a damaged model
        raise RunError(f"a boosted member of {path} is damaged ({exc}): train the run again") from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path} is damaged (not valid JSON: {exc}): train the run again") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    """Valid JSON always (a NaN metric is null), written beside and renamed into place."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, ensure_ascii=False, allow_nan=False))
    tmp.replace(path)


def metrics_to_dict(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s: {t: m.to_dict() for t, m in per.items()} for s, per in metrics.items()}


def bank_record(location: BankLocation) -> dict[str, Any]:
    """Where a run's bank lives, as config.json records it (never the API key): an
    absolute folder for an embedded bank, so the run finds it from any directory."""
    if location.is_server:
        return {"location": location.describe(), "url": location.qdrant_url, "collection": location.collection}
    return {"location": location.describe(), "path": str(Path(location.path).resolve())}


def bank_from_record(record: dict[str, Any]) -> BankLocation | None:
    """The location a run recorded (None when it recorded none); runs saved before the
    record had fields hold only the display string, "PATH" or "URL (collection NAME)"."""
    if record.get("url"):
        return BankLocation(qdrant_url=record["url"], collection=record.get("collection") or DEFAULT_COLLECTION)
    if record.get("path"):
        return BankLocation(path=Path(record["path"]))
    text = str(record.get("location") or "")
    match = re.fullmatch(r"(\S+) \(collection (.+)\)", text)
    if match:
        return BankLocation(qdrant_url=match.group(1), collection=match.group(2))
    return BankLocation(path=Path(text)) if text else None


def save_run(
    result: TrainResult, cfg: TrainConfig, out_dir: Path, manifest: Manifest, bank: BankLocation
) -> None:
    """Write the run into a fresh folder beside `out_dir`, then put it in `out_dir`'s
    place: a run that dies half-way leaves the previous run whole, never new weights
    with an old config."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_run(result, cfg, work, manifest, bank)
        _swap_in(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _swap_in(new: Path, out_dir: Path) -> None:
    """Move the folder `new` to `out_dir`, replacing what was there."""
    if not out_dir.exists():
        new.replace(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    out_dir.replace(old)
    new.replace(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write_run(
    result: TrainResult, cfg: TrainConfig, out_dir: Path, manifest: Manifest, bank: BankLocation
) -> None:
    state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS))
    data = result.data
    gbdt_files = result.gbdt.save(out_dir) if result.gbdt is not None else []
    _write_json(
        out_dir / CONFIG,
        {
            "format": RUN_FORMAT,
            # the weights this config belongs to: a run torn apart is refused on load
            "weights_sha256": _sha256(out_dir / WEIGHTS),
            "model": result.model_config.to_dict(),
            "train": cfg.to_dict(),
            "targets": data.target_names,
            "target_norm": data.norm.to_dict(),
            "interval_scale": result.interval_scale.tolist(),
            "time_safe": data.time_safe,
            "meta_features": data.featurizer.to_dict() if data.featurizer is not None else None,
            "lexicon": data.lexicon.to_dict() if data.lexicon is not None else None,
            "bank": {**bank_record(bank), "manifest": manifest.to_dict(), "fingerprint": data.snapshot.fingerprint},
            "members": {
                "blend_weights": (result.blend_weights if result.blend_weights is not None else np.ones(len(data.target_names))).tolist(),
                "gbdt_files": gbdt_files,
                "gbdt_sha256": {name: _sha256(out_dir / name) for bag in gbdt_files for name in bag},
                "gbdt_categorical": result.gbdt.categorical if result.gbdt is not None else [],
            },
        },
    )
    index = data.neighbour_index
    if index is not None:  # evaluation and scoring search the graph training searched
        shutil.copytree(index.folder, out_dir / INDEX_DIR / index.digest)
    ids = data.snapshot.item_ids
    _write_json(out_dir / SPLITS, {s: [ids[i] for i in idx] for s, idx in data.splits.items()})
    _write_json(
        out_dir / METRICS,
        {
            "best_epoch": result.best_epoch,
            "seconds_per_epoch": result.seconds_per_epoch,
            "gbdt_seconds": result.gbdt_seconds,
            "history": [asdict(h) for h in result.history],
            "metrics": metrics_to_dict(result.metrics),
            "members": {m: metrics_to_dict(per) for m, per in result.member_metrics.items()},
            "neighbour_index": None
            if index is None
            else {
                "vectors": index.meta["vectors"],
                "build_seconds": index.built_seconds,
                "recall_at_10": data.neighbour_recall,
            },
        },
    )


@dataclass
class Run:
    """A trained predictor and everything needed to use it on its bank."""

    path: Path
    model: PopularityModel
    model_config: ModelConfig
    train_config: TrainConfig
    targets: list[str]
    norm: TargetNorm
    interval_scale: np.ndarray
    time_safe: bool
    manifest: Manifest
    bank: BankLocation | None
    split_ids: dict[str, list[str]]
    featurizer: MetaFeaturizer | None = None
    lexicon: Lexicon | None = None
    # the bank's content when the run was trained (retriever.snapshot.bank_fingerprint)
    bank_fingerprint: str = ""
    # the boosted member (None: the network alone) and the network's blend weight per target
    gbdt: GbdtMember | None = None
    blend_weights: np.ndarray | None = None

    @classmethod
    def load(cls, path: Path) -> Run:
        """Read a run directory. Anything missing, damaged or torn (weights that are not
        the config's) is a RunError naming the file and what to do."""
        path = Path(path)
        for name in (WEIGHTS, CONFIG, SPLITS):
            if not (path / name).exists():
                raise RunError(f"{path} is not a run directory: {name} is missing")
        cfg = _read_json(path / CONFIG)
        if not isinstance(cfg, dict) or cfg.get("format") != RUN_FORMAT:
            found = cfg.get("format") if isinstance(cfg, dict) else None
            raise RunError(f"{path / CONFIG}: run format {found} is not supported (expected {RUN_FORMAT})")
        recorded = cfg.get("weights_sha256")
        if recorded and recorded != _sha256(path / WEIGHTS):
            raise RunError(
                f"{path / WEIGHTS} is not the weights {path / CONFIG} was written with (the run "
                "was written only in part, or the file was changed): train the run again"
            )
        try:
            model_config = ModelConfig.from_dict(cfg["model"])
            run = cls(
                path=path,
                model=PopularityModel(model_config),
                model_config=model_config,
                train_config=TrainConfig.from_dict(
                    # saved before neighbour indexes existed: trained on exact neighbours
                    cfg["train"] if "neighbour_index" in cfg["train"] else {"neighbour_index": "exact", **cfg["train"]}
                ),
                targets=list(cfg["targets"]),
                norm=TargetNorm.from_dict(cfg["target_norm"]),
                interval_scale=np.asarray(cfg["interval_scale"], np.float32),
                time_safe=bool(cfg["time_safe"]),
                manifest=Manifest.from_dict(cfg["bank"]["manifest"]),
                bank=bank_from_record(cfg["bank"]),
                split_ids=_read_json(path / SPLITS),
                featurizer=MetaFeaturizer.from_dict(cfg["meta_features"])
                if cfg.get("meta_features")
                else None,
                lexicon=Lexicon.from_dict(cfg["lexicon"]) if cfg.get("lexicon") else None,
                bank_fingerprint=str(cfg["bank"].get("fingerprint") or ""),
                blend_weights=np.asarray(cfg["members"]["blend_weights"], np.float32) if cfg.get("members") else None,
            )
        except RunError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise RunError(f"{path / CONFIG} is incomplete or damaged ({what}): train the run again") from exc
        try:
            state = load_file(str(path / WEIGHTS))
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise RunError(f"{path / WEIGHTS} is damaged ({exc}): train the run again") from exc
        bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise RunError(f"{path / WEIGHTS} holds weights that are not finite ({', '.join(bad[:3])}): train the run again")
        missing, unexpected = run.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RunError(
                f"{path / WEIGHTS} does not match {path / CONFIG} (missing {missing}, unexpected {unexpected})"
            )
        run.model.eval()
        run.gbdt = _load_gbdt(path, cfg.get("members") or {})
        return run

    def missing_from(self, snapshot: BankSnapshot) -> tuple[int, int]:
        """(items of the run's splits that `snapshot` lacks, items of the run's splits)."""
        have = snapshot.index_of()
        ids = [i for split in self.split_ids.values() for i in split]
        return sum(1 for i in ids if i not in have), len(ids)

    def splits_in(self, snapshot: BankSnapshot) -> dict[str, np.ndarray]:
        """The run's splits as snapshot indices; items since removed from the bank are dropped."""
        pos = snapshot.index_of()
        return {
            s: np.array(sorted(pos[i] for i in ids if i in pos), dtype=np.int64)
            for s, ids in self.split_ids.items()
        }

    def metrics(self) -> dict[str, Any]:
        p = self.path / METRICS
        return json.loads(p.read_text()) if p.exists() else {}
