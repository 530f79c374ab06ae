"""What a model file holds and a training run is defined by: the stage-1 and refinement configurations, the named
recipes, and reading a recipe from a name or a YAML/JSON file. Below the model file format (`model_io`) and the jobs
that train or run a model, so that neither depends on the other."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from fetalpipe.data.augment import AUGMENT_PRESETS, REFINEMENT_AUGMENT_PRESETS
from fetalpipe.model.heatmaps import HeatmapCodec
from fetalpipe.model.networks import MODEL_CONFIGS, ModelConfig
from fetalpipe.model.polar import PolarCodec


def _model_and_fields(config_class, values: dict, what: str) -> tuple[dict, dict]:
    """(the nested model config, the other fields) of a config dict; a key the class does not have is an error."""
    values = dict(values)
    model = values.pop("model", {})
    unknown = set(values) - {f.name for f in dataclasses.fields(config_class)}
    if unknown:
        raise ValueError(f"unknown {what} config keys: {sorted(unknown)}")
    return model, values




POLAR_LOSSES = ("cross_entropy", "cross_entropy_integral")
LOSS_WEIGHTINGS = ("uniform", "mm_per_map_pixel")  # TrainConfig.loss_weighting


def _check_preset(name: str, presets, what: str) -> None:
    """A misspelt preset fails when the recipe is read, not inside a Ray job minutes later."""
    if name not in presets:
        raise ValueError(f"unknown {what} {name!r}; one of {sorted(presets)}")


@dataclass(frozen=True)
class RefinementConfig:
    """Stage 2: the outline in a polar crop of the original image around a prior ellipse (`fetalpipe.model.polar`).
    Trained on jittered reference ellipses, so it learns to correct stage 1, whatever stage 1 it follows."""

    # Full-resolution U-Net on the 128 x 64 crop, narrow (8 channels at the top): 13 ms a training image at 1 thread.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(base_width=8, depth=5, stem_stride=1, max_width=64, output="logits"))
    angles: int = 96
    radii: int = 64
    radius_range: tuple[float, float] = (0.75, 1.25)
    wrap_rows: int = 16
    sigma_bins: float = 1.5
    jitter_scale: float = 1.0  # 1: stage 1's error size (`polar.jitter`)
    axis_jitter_scale: float = 1.0  # the axes' jitter alone, relative to jitter_scale (> 1: trust the prior's size less)
    # The share of training crops taken around the manifest's stored stage-1 prior (`manifest.STAGE1_PRIOR_COLUMNS`, e.g.
    # a stage 1 trained on other images: studies/out_of_fold_priors.py) instead of a jittered reference: stage 1's own errors.
    stage1_prior_share: float = 0.0
    epochs: int = 40
    batch_size: int = 16
    lr: float = 2e-3
    augment: bool = True
    augmentation: str = "standard"  # with augment: a name in `augment.REFINEMENT_AUGMENT_PRESETS`
    loss: str = "cross_entropy"  # a name in POLAR_LOSSES (`train.polar_loss`)

    def __post_init__(self):
        _check_preset(self.augmentation, REFINEMENT_AUGMENT_PRESETS, "refinement augmentation")
        _check_preset(self.loss, POLAR_LOSSES, "refinement loss")
        if not 0.0 <= self.stage1_prior_share <= 1.0:
            raise ValueError(f"refinement.stage1_prior_share must lie in [0, 1]; got {self.stage1_prior_share}")

    def codec(self) -> PolarCodec:
        return PolarCodec(angles=self.angles, radii=self.radii, radius_range=tuple(self.radius_range), wrap_rows=self.wrap_rows,
                          sigma_bins=self.sigma_bins)

    @classmethod
    def from_dict(cls, values: dict) -> "RefinementConfig":
        model, values = _model_and_fields(cls, values, "refinement")
        if "radius_range" in values:
            values["radius_range"] = tuple(values["radius_range"])
        return cls(model=model if isinstance(model, ModelConfig) else ModelConfig(**{**dataclasses.asdict(cls().model), **model}), **values)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run's result (not where or on how many workers it runs)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    input_size: int = 256
    sigma_px: float = 5.0
    layout: str = "ordered"
    edge_scale_px: float = 0.0  # ``ellipse`` only: soft-edge target (HeatmapCodec.edge_scale_px); 0 = anti-aliased edge
    refine: bool = False  # sub-pixel decoding in validation; the seed used plain argmax
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine"
    loss: str = "mse"  # or "weighted_mse" (foreground pixels weigh more), "bce" or "bce_dice" (for the ellipse map)
    foreground_weight: float = 10.0
    # "uniform", or "mm_per_map_pixel": each image's loss weighted by the mm one map pixel covers in it (`train.image_loss_weights`)
    loss_weighting: str = "uniform"
    augment: bool = False
    augmentation: str = "standard"  # with augment: a name in `augment.AUGMENT_PRESETS` ("standard": HC18-like frames)
    bf16: bool = False  # stage 1 under bf16 autocast (`fetalpipe train --bf16`): for CPUs with native bf16 (`train.native_bf16`)
    channels_last: bool = False
    val_fraction: float = 0.15
    init_from: str = ""  # a model file whose stage-1 weights start the training (fine-tuning); "" = random initialisation
    refinement: RefinementConfig | None = None  # a second stage at native resolution (trained after this one)

    def __post_init__(self):
        _check_preset(self.augmentation, AUGMENT_PRESETS, "augmentation")
        _check_preset(self.loss_weighting, LOSS_WEIGHTINGS, "loss weighting")

    def codec(self) -> HeatmapCodec:
        return HeatmapCodec(
            input_size=self.input_size,
            heatmap_size=self.input_size // self.model.stem_stride,
            sigma_px=self.sigma_px,
            layout=self.layout,
            refine=self.refine,
            edge_scale_px=self.edge_scale_px,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        model, values = _model_and_fields(cls, values, "training")
        model_config = model if isinstance(model, ModelConfig) else ModelConfig(**model)
        refinement = values.pop("refinement", None)
        if refinement is not None and not isinstance(refinement, RefinementConfig):
            refinement = RefinementConfig.from_dict(refinement)
        return cls(model=model_config, refinement=refinement, **values)

    def without_refinement(self) -> "TrainConfig":
        return dataclasses.replace(self, refinement=None)


TRAIN_CONFIGS = {
    # The seed report's configuration, faithfully: 256² stretch, σ=5, MSE on sigmoid maps, Adam 1e-3, batch 8, 30 epochs, argmax.
    "seed": TrainConfig(),
    # Half-resolution U-Net trunk (4x cheaper), order-free pair targets,
    # augmentation, foreground-weighted loss, cosine schedule, sub-pixel decoding.
    "fast": TrainConfig(
        model=MODEL_CONFIGS["fast"], layout="pairs", refine=True, epochs=40, batch_size=8, lr=2e-3,
        lr_schedule="cosine", loss="weighted_mse", augment=True,
    ),
    # Landmarks through geometry: the same cheap trunk predicts the filled head ellipse (a segmentation
    # map, learnt far faster than 4 isolated peaks) and decoding fits an ellipse and takes its axes.
    "ellipse": TrainConfig(
        model=MODEL_CONFIGS["fast"], layout="ellipse", refine=True, epochs=30, batch_size=8, lr=2e-3,
        lr_schedule="cosine", loss="bce", augment=True,
    ),
    # The shipped configuration: `ellipse` on the deeper trunk, whole-image context for the large heads
    # `ellipse` under-segments. channels_last only changes speed (8 % faster per step in one process, BENCHMARKS.md).
    "ellipse_deep": TrainConfig(
        model=MODEL_CONFIGS["fast_deep"], layout="ellipse", refine=True, epochs=30, batch_size=8, lr=2e-3,
        lr_schedule="cosine", loss="bce", augment=True, channels_last=True,
    ),
    # The shipped configuration: `ellipse_deep`, then a refinement stage that fits the outline again at native resolution.
    "ellipse_refine": TrainConfig(
        model=MODEL_CONFIGS["fast_deep"], layout="ellipse", refine=True, epochs=30, batch_size=8, lr=2e-3,
        lr_schedule="cosine", loss="bce", augment=True, channels_last=True, refinement=RefinementConfig(),
    ),
    # The seed report's §d "+ resize, no heatmaps" baseline: a CNN regresses the 8 coordinates, MSE, Adam 1e-3,
    # batch 8, no augmentation. Its encoder is `fast_deep`'s (global context at the 4x4 bottleneck), not the seed's.
    "coordinates": TrainConfig(
        model=MODEL_CONFIGS["fast_deep"], layout="coordinates", epochs=30, batch_size=8, lr=1e-3, loss="mse", channels_last=True,
    ),
}


def resolve_config(name_or_file: str, overrides: dict | None = None) -> TrainConfig:
    """A named config, or a JSON/YAML file of TrainConfig fields (optionally with `base: NAME`)."""
    if name_or_file in TRAIN_CONFIGS:
        values = TRAIN_CONFIGS[name_or_file].to_dict()
    elif os.path.isfile(name_or_file):
        import yaml

        with open(name_or_file) as handle:
            loaded = yaml.safe_load(handle) or {}
        values = TRAIN_CONFIGS[loaded.pop("base", "seed")].to_dict()
        model_overrides = loaded.pop("model", {})
        values["model"].update(model_overrides)
        values.update(loaded)
    else:
        raise ValueError(f"--config must be one of {sorted(TRAIN_CONFIGS)} or a YAML/JSON file; got {name_or_file!r}")
    if overrides:
        values.update({key: value for key, value in overrides.items() if value is not None})
    if values.get("init_from"):  # the training workers may run in another folder
        values["init_from"] = os.path.abspath(values["init_from"])
    values["model"]["out_maps"] = HeatmapCodec(layout=values["layout"]).num_maps
    values["model"]["head"] = "coordinates" if values["layout"] == "coordinates" else "heatmap"
    return TrainConfig.from_dict(values)
