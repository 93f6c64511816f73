"""The paper's planning setup as an nnU-Net experiment planner.

nnU-Net cannot find a plugin planner by name (``-pl`` only searches the nnunetv2 package), so
``nnunet-ssl plan`` runs this planner through nnU-Net's API (see :mod:`nnunet_ssl.plans.plan_command`).
It plans nnU-Net's way and then applies the paper's settings to the ``3d_fullres`` configuration,
in its own plans file, never touching nnU-Net's ``nnUNetPlans.json``:

* target spacing 1.5 x 1.5 x 2 mm (x, y, z; nnU-Net stores spacings in reversed image-axis order);
* patch 96^3 (128^3 for ``smit128``: the preset's ``input_size``), batch size 2;
* CT: a fixed HU window [L, U] mapped to [0, 1] with the built-in ``CTNormalization`` (clip to
  percentiles L and U, subtract mean = L, divide by std = U - L), so training and
  ``nnUNetv2_predict`` apply exactly the same mapping;
* MR (default ``percentile``): the paper's "[0, 1] after clipping at the 5 % and 95 % signal
  intensity values", as pretraining does it. nnU-Net 2.8.1 looks normalization schemes up only
  inside its own package and has no per-image percentile scheme, so the planner stands in one of its
  built-in schemes, measured on the dataset's own training images where the anatomy is, on the
  foreground (:mod:`nnunet_ssl.plans.mr_normalization`): the same window for every image
  (``CTNormalization`` with the medians of the images' 5th and 95th percentiles) or per-image min-max
  (``RescaleTo01Normalization``); a window that clips the foreground of some image is not chosen.
  ``mr_scheme`` forces one (``window``, ``minmax``). The measurements (errors, clipping, the contrast
  between the labelled structures before and after) are logged and kept in the plans. Options:
  ``window`` (a fixed window, e.g. the paper's [0, 400]) and ``zscore`` (nnU-Net's default), both
  measured and reported the same way.

The plans keep nnU-Net's U-Net architecture entry, recomputed for the new patch size, so the file
stays valid for nnU-Net's own trainers; the Swin trainers build their network from the preset.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from tqdm import tqdm

from nnunet_ssl.networks.family import get_family
from nnunet_ssl.networks.presets import get_preset
from nnunet_ssl.plans.mr_normalization import (
    NNUNET_SCHEMES,
    SCHEME_TITLES,
    ImageSample,
    MRChoice,
    MRMeasurement,
    choose_mr_scheme,
    dataset_label_names,
    describe_measurement,
    measure_mr_normalization,
    percentile_map,
    sample_image,
)

logger = logging.getLogger(__name__)

#: Name of the plans file (and plans identifier) the plugin writes by default.
DEFAULT_PLANS_NAME = get_family("swin").ssl_plans
#: Only this configuration is planned: the Swin trainers are 3D only.
CONFIGURATION = "3d_fullres"
MODALITIES = ("ct", "mr")
MR_NORMALIZATIONS = ("percentile", "window", "zscore")
#: Which built-in scheme stands in for the percentile mapping: measured (``auto``) or forced.
MR_SCHEMES = ("auto", "window", "minmax")
#: At most this many training images are read to fit the MR percentile approximation.
MR_SAMPLE_CASES = 24
#: ... each on at most this many evenly strided voxels.
MR_SAMPLE_VOXELS = 1_000_000


@dataclass(frozen=True)
class SwinPlanSettings:
    """What ``nnunet-ssl plan`` applies on top of nnU-Net's planning.

    Attributes:
        preset: Architecture preset; its ``input_size`` is the default patch edge.
        modality: ``"ct"`` or ``"mr"`` for every channel, or None to read each channel's name from
            dataset.json (``CT`` -> ct, anything else -> mr).
        hu_window: CT window (lower, upper) in HU, mapped to [0, 1].
        spacing_xyz: Target spacing in mm along the image's x, y, z axes.
        patch_size: Patch edge lengths (z, y, x as nnU-Net stores them); None = the preset's ``input_size``, cubic.
        batch_size: Patches per training step.
        plans_name: Plans identifier and file name (``<plans_name>.json``).
        mr_normalization: MR channels: ``"percentile"`` (the paper: per-image percentiles to [0, 1],
            through the closest built-in scheme), ``"window"`` (``mr_window`` to [0, 1]) or ``"zscore"``.
        mr_scheme: With ``"percentile"``: the built-in stand-in, ``"auto"`` (measured on the foreground,
            see :mod:`nnunet_ssl.plans.mr_normalization`), ``"window"`` (the shared window) or
            ``"minmax"`` (per-image min-max).
        mr_percentiles: The percentiles mapped to 0 and 1 (the paper: 5 and 95).
        mr_window: Fixed MR window (lower, upper) for ``mr_normalization="window"``.
    """

    preset: str = "smit"
    modality: str | None = None
    hu_window: tuple[float, float] = (-175.0, 250.0)
    spacing_xyz: tuple[float, float, float] = (1.5, 1.5, 2.0)
    patch_size: tuple[int, int, int] | None = None
    batch_size: int = 2
    plans_name: str = DEFAULT_PLANS_NAME
    mr_normalization: str = "percentile"
    mr_scheme: str = "auto"
    mr_percentiles: tuple[float, float] = (5.0, 95.0)
    mr_window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        get_preset(self.preset)  # raises on unknown names
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES} or None, got {self.modality!r}")
        low, high = self.hu_window
        if not high > low:
            raise ValueError(f"the HU window must have lower < upper, got {list(self.hu_window)}")
        if len(self.spacing_xyz) != 3 or min(self.spacing_xyz) <= 0 or max(self.spacing_xyz) > 20:
            raise ValueError(f"spacing must be three positive sizes in mm (<= 20), got {list(self.spacing_xyz)}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 64
                                            or any(p % 32 for p in self.patch_size)):
            raise ValueError(
                f"patch size must be three multiples of 32, each >= 64 (the encoder's stride), got {self.patch_size}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.mr_normalization not in MR_NORMALIZATIONS:
            raise ValueError(f"MR normalization must be one of {MR_NORMALIZATIONS}, got {self.mr_normalization!r}")
        if self.mr_scheme not in MR_SCHEMES:
            raise ValueError(f"MR scheme must be one of {MR_SCHEMES}, got {self.mr_scheme!r}")
        if self.mr_scheme != "auto" and self.mr_normalization != "percentile":
            raise ValueError(f"MR scheme {self.mr_scheme!r} stands in for the percentile mapping; with MR "
                             f"normalization {self.mr_normalization!r} leave it 'auto'")
        if (self.mr_normalization == "window") != (self.mr_window is not None):
            raise ValueError("give an MR window (--mr-window LOW HIGH) exactly when the MR normalization is 'window'")
        if self.mr_window is not None and not self.mr_window[1] > self.mr_window[0]:
            raise ValueError(f"the MR window must have lower < upper, got {list(self.mr_window)}")
        low_pct, high_pct = self.mr_percentiles
        if not 0 <= low_pct < high_pct <= 100:
            raise ValueError(f"MR percentiles must satisfy 0 <= low < high <= 100, got {list(self.mr_percentiles)}")
        if self.plans_name == "nnUNetPlans":
            raise ValueError("nnUNetPlans is nnU-Net's own plans file; choose another --plans-name")

    @property
    def spacing_nnunet(self) -> list[float]:
        """The spacing in nnU-Net's axis order (z, y, x): its readers reverse the image axes."""
        return [float(s) for s in reversed(self.spacing_xyz)]

    @property
    def forced_mr_scheme(self) -> str | None:
        """The MR scheme the user chose (``window``, ``minmax``, ``zscore``), or None when it is measured."""
        if self.mr_normalization == "zscore":
            return "zscore"
        if self.mr_normalization == "window":
            return "window"
        return None if self.mr_scheme == "auto" else self.mr_scheme

    @property
    def patch(self) -> list[int]:
        if self.patch_size is not None:
            return [int(p) for p in self.patch_size]
        return [get_preset(self.preset).input_size] * 3


def window_properties(low: float, high: float, fingerprint_properties: dict[str, Any]) -> dict[str, Any]:
    """CTNormalization properties mapping [low, high] HU affinely to [0, 1] (and clipping outside).

    ``CTNormalization`` computes ``(clip(x, p00_5, p99_5) - mean) / std``; with p00_5 = mean = low and
    p99_5 = high, std = high - low this is the window. The fingerprint's other statistics are kept.
    """
    return {**fingerprint_properties, "mean": float(low), "std": float(high - low),
            "percentile_00_5": float(low), "percentile_99_5": float(high)}


@dataclass(frozen=True)
class MRApproximation:
    """The built-in stand-in for the per-image percentile mapping of one MR channel.

    Attributes:
        scheme: ``"CTNormalization"`` (one window for all images) or ``"RescaleTo01Normalization"``.
        window: The shared window (medians of the images' low and high percentiles).
        window_difference: Mean |window mapping - exact per-image mapping| over the sampled voxels.
        rescale_difference: The same for per-image min-max.
        cases: Images measured.
    """

    scheme: str
    window: tuple[float, float]
    window_difference: float
    rescale_difference: float
    cases: int

    def note(self, percentiles: tuple[float, float]) -> str:
        chosen = "one window" if self.scheme == "CTNormalization" else "per-image min-max"
        return (
            f"approximates per-image {percentiles[0]:g}-{percentiles[1]:g} % -> [0, 1] with {chosen} "
            f"(mean |difference| {min(self.window_difference, self.rescale_difference):.4f} on {self.cases} training "
            f"image(s); window {self.window_difference:.4f}, min-max {self.rescale_difference:.4f})"
        )


def mr_percentile_approximation(images: list[np.ndarray], percentiles: tuple[float, float]) -> MRApproximation:
    """Measure both built-in stand-ins for :func:`percentile_map` on ``images`` and pick the closer one.

    Over all voxels, background included: the planner now measures on the foreground
    (:func:`nnunet_ssl.plans.mr_normalization.measure_mr_normalization`); this stays for comparisons
    (``benchmarks/bench_mr_normalization.py``).

    Args:
        images: Raw intensities of one channel, any shapes (e.g. sampled voxels of each training image).
        percentiles: ``(low, high)``, e.g. ``(5, 95)``.
    """
    if not images:
        raise ValueError("no image to fit the MR percentile mapping to")
    bounds = np.array([np.percentile(image, percentiles) for image in images], dtype=np.float64)
    low, high = float(np.median(bounds[:, 0])), float(np.median(bounds[:, 1]))
    if not high > low:
        raise ValueError(f"the MR images' {percentiles} percentiles coincide ({low:g}); use --mr-normalization zscore")
    window_diffs, rescale_diffs = [], []
    for image in images:
        image = np.asarray(image, dtype=np.float64)
        exact = percentile_map(image, percentiles)
        window_diffs.append(np.abs(np.clip((image - low) / (high - low), 0, 1) - exact).mean())
        span = max(float(image.max() - image.min()), 1e-8)
        rescale_diffs.append(np.abs((image - image.min()) / span - exact).mean())
    window_difference, rescale_difference = float(np.mean(window_diffs)), float(np.mean(rescale_diffs))
    scheme = "CTNormalization" if window_difference <= rescale_difference else "RescaleTo01Normalization"
    return MRApproximation(scheme, (low, high), window_difference, rescale_difference, len(images))


def coarsening_hint(source_spacings_nnunet: list[list[float]], settings: SwinPlanSettings, dataset: str) -> str | None:
    """A one-line hint when the target spacing is coarser than the data's median spacing on some axis."""
    if not source_spacings_nnunet:
        return None
    median_xyz = [float(v) for v in reversed(np.median(np.asarray(source_spacings_nnunet, dtype=float), axis=0))]
    coarser = [axis for axis, (target, own) in enumerate(zip(settings.spacing_xyz, median_xyz, strict=True))
               if target > own * 1.1]
    if not coarser:
        return None
    keep = [max(min(t, s), 1e-3) for t, s in zip(settings.spacing_xyz, median_xyz, strict=True)]
    axes = ", ".join("xyz"[a] for a in coarser)
    return (
        f"the target spacing {' x '.join(f'{s:g}' for s in settings.spacing_xyz)} mm coarsens this dataset along {axes} "
        f"(median spacing {' x '.join(f'{s:.3g}' for s in median_xyz)} mm, x y z); to keep its resolution plan with "
        f"`nnunet-ssl plan -d {dataset} --spacing {' '.join(f'{s:.3g}' for s in keep)}`"
    )


def channel_modalities(dataset_json: dict[str, Any], modality: str | None) -> list[str]:
    """``ct``/``mr`` per input channel."""
    names = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    ordered = [names[k] for k in sorted(names, key=int)]
    if modality is not None:
        return [modality] * len(ordered)
    return ["ct" if str(n).strip().upper() == "CT" else "mr" for n in ordered]


class SwinPlanner(ExperimentPlanner):
    """nnU-Net's ExperimentPlanner with the paper's setup applied to ``3d_fullres`` (see module doc)."""

    def __init__(self, dataset_name_or_id: str | int, settings: SwinPlanSettings) -> None:
        super().__init__(
            dataset_name_or_id,
            plans_name=settings.plans_name,
            overwrite_target_spacing=settings.spacing_nnunet,
        )
        self.settings = settings
        self.mr_notes: dict[str, Any] = {}

    def save_plans(self, plans: dict) -> None:
        """nnU-Net calls this at the end of ``plan_experiment``: measure the MR channels, adapt, then save as usual."""
        config = plans["configurations"].get(CONFIGURATION, {})
        use_mask = config.get("use_mask_for_norm", [])
        modalities = channel_modalities(self.dataset_json, self.settings.modality)
        measurements = {
            channel: self.measure_mr_channel(channel, bool(use_mask[channel]) if channel < len(use_mask) else False)
            for channel, modality in enumerate(modalities) if modality == "mr"
        }
        super().save_plans(self.adapt_plans(plans, measurements))

    def adapt_plans(self, plans: dict, measurements: dict[int, MRMeasurement] | None = None) -> dict:
        """Keep only ``3d_fullres`` and apply patch, batch and normalization settings.

        Args:
            plans: nnU-Net's plans.
            measurements: Per MR channel, from :meth:`measure_mr_channel`; a channel without one is
                measured here when its scheme is to be chosen (``mr_normalization="percentile"``).
        """
        if CONFIGURATION not in plans["configurations"]:
            raise ValueError(f"{self.dataset_name} is not a 3D dataset: nnU-Net planned no {CONFIGURATION}")
        config = plans["configurations"][CONFIGURATION]
        config.pop("next_stage", None)
        plans["configurations"] = {CONFIGURATION: config}
        modalities = channel_modalities(self.dataset_json, self.settings.modality)
        self._set_patch_and_batch(config)
        self._set_normalization(plans, config, modalities, measurements or {})
        plans["nnunet_ssl"] = {
            "planner": type(self).__name__,
            "preset": self.settings.preset,
            "spacing_xyz_mm": list(self.settings.spacing_xyz),
            "hu_window": list(self.settings.hu_window),
            "modalities": modalities,
            "mr_normalization": {"mode": self.settings.mr_normalization,
                                 "scheme": self.settings.mr_scheme,
                                 "percentiles": list(self.settings.mr_percentiles),
                                 **({"window": list(self.settings.mr_window)} if self.settings.mr_window else {}),
                                 **self.mr_notes},
        }
        return plans

    def _set_patch_and_batch(self, config: dict) -> None:
        patch = self.settings.patch
        spacing = config["spacing"]
        _, pool_kernels, conv_kernels, fitted, _ = get_pool_and_conv_props(
            spacing, patch, self.UNet_featuremap_min_edge_length, 999999
        )
        if list(fitted) != patch:
            raise ValueError(f"nnU-Net's topology cannot use patch {patch} at spacing {spacing} (it wants {fitted})")
        stages = len(pool_kernels)
        arch = config["architecture"]["arch_kwargs"]
        arch.update({
            "n_stages": stages,
            "kernel_sizes": conv_kernels,
            "strides": pool_kernels,
            "features_per_stage": [min(self.UNet_max_features_3d, self.UNet_base_num_features * 2**i)
                                   for i in range(stages)],
            "n_conv_per_stage": list(self.UNet_blocks_per_stage_encoder[:stages]),
            "n_conv_per_stage_decoder": list(self.UNet_blocks_per_stage_decoder[:stages - 1]),
        })
        config["patch_size"] = patch
        config["batch_size"] = self.settings.batch_size

    def _set_normalization(self, plans: dict, config: dict, modalities: list[str],
                           measurements: dict[int, MRMeasurement]) -> None:
        properties = plans["foreground_intensity_properties_per_channel"]
        low, high = self.settings.hu_window
        schemes, masks = [], []
        notes: dict[str, Any] = {}
        records: dict[str, Any] = {}
        for channel, modality in enumerate(modalities):
            fingerprint = properties.get(str(channel), {})
            nnunet_mask = bool(config["use_mask_for_norm"][channel]) if channel < len(config["use_mask_for_norm"]) \
                else False
            if modality == "ct":
                schemes.append("CTNormalization")
                masks.append(False)
                properties[str(channel)] = window_properties(low, high, fingerprint)
                continue
            measurement = measurements.get(channel)
            if measurement is None and self.settings.mr_normalization == "percentile":
                measurement = self.measure_mr_channel(channel, nnunet_mask)
            forced = self.settings.forced_mr_scheme
            if measurement is not None:
                choice = choose_mr_scheme(measurement, forced)
            else:  # a forced fixed window or z-score, nothing measured
                choice = MRChoice(str(forced), True, f"{SCHEME_TITLES[str(forced)]}, as asked")
            schemes.append(choice.nnunet_scheme)
            masks.append(nnunet_mask if choice.scheme == "zscore" else False)
            if choice.scheme == "window":
                window = self.settings.mr_window
                if window is None:  # the fitted shared window: mode percentile, so it was measured
                    if measurement is None:
                        raise ValueError(f"MR channel {channel}: no window to use (nothing was measured)")
                    window = measurement.window
                properties[str(channel)] = window_properties(window[0], window[1], fingerprint)
            notes[str(channel)] = mr_note(choice, measurement, self.settings)
            if measurement is not None:
                report = describe_measurement(measurement, choice)
                records[str(channel)] = {**measurement.to_json(), "chosen": choice.scheme,
                                         "nnunet_scheme": choice.nnunet_scheme, "forced": choice.forced,
                                         "reason": choice.reason, "report": report}
                warn_lost_contrast(channel, measurement, choice)
        config["normalization_schemes"] = schemes
        config["use_mask_for_norm"] = masks
        if records:
            notes["measurements"] = records
        self.mr_notes = notes

    def measure_mr_channel(self, channel: int, zscore_nonzero: bool = False) -> MRMeasurement:
        """Measure every MR scheme on up to :data:`MR_SAMPLE_CASES` training images (and their labels).

        Args:
            channel: Input channel.
            zscore_nonzero: nnU-Net's ``use_mask_for_norm`` of the channel: z-score statistics over the
                nonzero voxels.
        """
        reader = self.determine_reader_writer()()
        cases = sorted(self.dataset)
        if len(cases) > MR_SAMPLE_CASES:
            cases = [cases[i] for i in np.linspace(0, len(cases) - 1, MR_SAMPLE_CASES).round().astype(int)]
        samples: list[ImageSample] = []
        # a bar per case as nnU-Net's fingerprint and preprocessing show theirs (full-size MR images take seconds each)
        for case in tqdm(cases, desc=f"Measuring MR normalisation (channel {channel})"):
            data, _ = reader.read_images([self.dataset[case]["images"][channel]])
            label = None
            if self.dataset[case].get("label"):
                seg, _ = reader.read_seg(self.dataset[case]["label"])
                label = np.asarray(seg[0])
            samples.append(sample_image(case, np.asarray(data[0]), label, self.settings.mr_percentiles,
                                        MR_SAMPLE_VOXELS, zscore_nonzero=zscore_nonzero))
        return measure_mr_normalization(samples, self.settings.mr_percentiles,
                                        dataset_label_names(self.dataset_json.get("labels", {})),
                                        window=self.settings.mr_window)


def mr_note(choice: MRChoice, measurement: MRMeasurement | None, settings: SwinPlanSettings) -> str:
    """The one-line note kept in the plans and shown in the summary for one MR channel."""
    p_low, p_high = settings.mr_percentiles
    if settings.mr_normalization == "window":
        text = "fixed MR window"
    elif settings.mr_normalization == "zscore":
        text = "nnU-Net's z-score (not [0, 1]), as asked"
    else:
        text = (f"approximates per-image {p_low:g}-{p_high:g} % -> [0, 1] with {SCHEME_TITLES[choice.scheme]}"
                + (", as asked" if choice.forced else ""))
    if measurement is None:
        return text
    window, minmax = (measurement.schemes[name].mean_foreground_error for name in ("window", "minmax"))
    own = {"window": window, "minmax": minmax}.get(choice.scheme)
    figures = f"window {window:.4f}, min-max {minmax:.4f}"
    images = f"the foreground of {len(measurement.cases)} training image(s)"
    if own is None:
        return f"{text} (mean |difference| to it on {images}: {figures})"
    return f"{text} (mean |difference| {own:.4f} on {images}; {figures})"


def warn_lost_contrast(channel: int, measurement: MRMeasurement, choice: MRChoice) -> None:
    """Warn when the scheme used loses a labelled pair's contrast in some training image, naming a scheme that keeps it."""
    for pair in measurement.contrasts:
        lost = pair.lost(choice.scheme)
        if not lost:
            continue
        keeping = [name for name in NNUNET_SCHEMES if name != choice.scheme and not pair.lost(name)]
        hint = (f"; --mr-normalization {keeping[0]} keeps it in every image" if keeping else "")
        logger.warning(
            "MR channel %d: %s loses the %s contrast in %d of %d training images (%s)%s",
            channel, SCHEME_TITLES[choice.scheme], pair.name, len(lost), len(pair.counted()),
            ", ".join(measurement.cases[i] for i in lost[:4]) + (", ..." if len(lost) > 4 else ""), hint,
        )


def summarize_plans(plans: dict, settings: SwinPlanSettings) -> str:
    """A short human summary of what was planned."""
    config = plans["configurations"][CONFIGURATION]
    props = plans["foreground_intensity_properties_per_channel"]
    median = config.get("median_image_size_in_voxels")
    lines = [
        f"plans {plans['plans_name']} for {plans['dataset_name']} ({CONFIGURATION}, preset {settings.preset})",
        f"  spacing      {' x '.join(f'{s:g}' for s in settings.spacing_xyz)} mm (x, y, z); "
        f"nnU-Net order {[round(float(s), 4) for s in config['spacing']]}",
        f"  patch        {config['patch_size']} (z, y, x), batch size {config['batch_size']}",
    ]
    if median is not None:
        lines.append(f"  median image {[int(round(m)) for m in np.asarray(median).tolist()]} voxels after resampling")
    for channel, scheme in enumerate(config["normalization_schemes"]):
        p = props.get(str(channel), {})
        modality = (plans.get("nnunet_ssl", {}).get("modalities") or ["ct"] * (channel + 1))[channel].upper()
        mr_record = plans.get("nnunet_ssl", {}).get("mr_normalization", {})
        note = mr_record.get(str(channel))
        if scheme == "CTNormalization":
            unit = " HU" if modality == "CT" else ""
            text = f"{modality} window [{p['percentile_00_5']:.4g}, {p['percentile_99_5']:.4g}]{unit} -> [0, 1]"
        else:
            text = f"{modality} {scheme} (per image)"
        lines.append(f"  channel {channel}   {text}" + (f"; {note}" if note else ""))
        report = mr_record.get("measurements", {}).get(str(channel), {}).get("report", [])
        lines += [f"              {line}" for line in report]
    return "\n".join(lines)
