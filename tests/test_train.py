from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models.checkpoint import load_checkpoint
from models.data import read_image, read_mask
from models.inference import normalise
from models.metadata import BandInfo
from models.registry import build_model
from pipeline.cli import main
from tests.conftest import copy_kampala_pairs, kampala_card

CHIPS = (
    "OAM-1238448-1046528-21",
    "OAM-1238449-1046529-21",
    "OAM-1238450-1046530-21",
    "OAM-1238451-1046531-21",
)


def _four_chips(kampala: Path, tmp_path: Path) -> tuple[Path, Path]:
    return copy_kampala_pairs(kampala, tmp_path, CHIPS)


def _train_args(images: Path, masks: Path, out: Path, epochs: int) -> list[str]:
    return [
        "train",
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--classes",
        "background,building",
        "--arch",
        "deeplabv3_efficientnet_lite0",
        "--crop-size",
        "128",
        "--batch-size",
        "4",
        "--epochs",
        str(epochs),
        "--optimizer",
        "adam",
        "--lr",
        "0.001",
        "--seed",
        "3",
        "--fp32",
        "--out",
        str(out),
    ]


def _loss(model: torch.nn.Module, bands: list[BandInfo], images: Path, masks: Path) -> float:
    losses = []
    for stem in CHIPS:
        image = read_image(images / f"{stem}.tif")
        mask = torch.from_numpy(read_mask(masks / f"{stem}.tif", 2, 255))
        with torch.inference_mode():
            losses.append(float(F.cross_entropy(model(normalise(image, bands)[None]), mask[None])))
    return float(np.mean(losses))


def test_one_epoch_on_four_real_chips_runs_and_lowers_the_loss(kampala: Path, tmp_path: Path) -> None:
    images, masks = _four_chips(kampala, tmp_path)
    first = tmp_path / "first.safetensors"
    assert main(_train_args(images, masks, first, epochs=1)) == 0
    metadata = load_checkpoint(first).metadata
    history = metadata.metrics["history"]
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    assert metadata.training["seed"] == 3 and "deeplab train" in metadata.training["command"]
    assert metadata.pixel_size_m is not None and 0.05 < metadata.pixel_size_m < 0.1  # zoom-21 chips: 7.5 cm
    # The same network before training: the ImageNet-initialised model the run started from.
    untrained = build_model("deeplabv3_efficientnet_lite0", 2, 3, 16, "imagenet").eval()
    untrained_loss = _loss(untrained, metadata.bands, images, masks)
    trained_loss = _loss(load_checkpoint(first).model, metadata.bands, images, masks)
    assert trained_loss < untrained_loss, (untrained_loss, trained_loss)


@pytest.mark.slow
def test_training_is_deterministic_and_resumes_exactly(kampala: Path, tmp_path: Path) -> None:
    images, masks = _four_chips(kampala, tmp_path)
    straight, resumed = tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors"
    assert main(_train_args(images, masks, straight, epochs=2)) == 0
    assert main([*_train_args(images, masks, resumed, epochs=2), "--stop-after", "1"]) == 0
    assert load_checkpoint(resumed).metadata.training["epochs_completed"] == 1
    assert main(_train_args(images, masks, resumed, epochs=2)) == 0
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fine_tuning_starts_from_a_checkpoint_and_renders_a_card(kampala: Path, tmp_path: Path) -> None:
    images, masks = _four_chips(kampala, tmp_path)
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    assert main([*_train_args(images, masks, first, epochs=1)]) == 0
    args = _train_args(images, masks, second, epochs=1)
    args[args.index("--lr") + 1] = "1e-12"  # Adam steps of ~1e-12: the weights stay where they started
    assert main([*args, "--init-from", str(first)]) == 0
    a, b = load_file(str(first)), load_file(str(second))
    stem = "backbone._conv_stem.weight"
    torch.testing.assert_close(a[stem], b[stem], atol=1e-6, rtol=0)
    assert load_checkpoint(second).metadata.bands == load_checkpoint(first).metadata.bands
    text = kampala_card(second, tmp_path)
    assert "OpenAerialMap" in text and "deeplabv3_efficientnet_lite0" in text and "--init-from" in text


def test_init_from_a_checkpoint_of_another_architecture_is_refused(kampala: Path, tmp_path: Path) -> None:
    images, masks = _four_chips(kampala, tmp_path)
    first = tmp_path / "first.safetensors"
    assert main(_train_args(images, masks, first, epochs=1)) == 0
    args = _train_args(images, masks, tmp_path / "other.safetensors", epochs=1)
    args[args.index("--arch") + 1] = "deeplabv3plus_efficientnet_lite0"
    assert main([*args, "--init-from", str(first)]) == 2
    assert not (tmp_path / "other.safetensors").exists()


def _four_band_chips(images: Path, target: Path) -> Path:
    """The chips with a fourth band (a stand-in for near infrared: the mean of red and green)."""
    target.mkdir()
    for chip in sorted(images.glob("*.tif")):
        with rasterio.open(chip) as source:
            pixels = source.read()
            profile = source.profile | {"count": 4}
        extra = ((pixels[0].astype(np.uint16) + pixels[1]) // 2).astype(np.uint8)
        with rasterio.open(target / chip.name, "w", **profile) as sink:
            sink.write(np.concatenate([pixels, extra[None]]))
    return target


def test_init_from_adapts_a_checkpoint_to_other_classes_and_bands(
    kampala: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 2-class RGB model becomes a 3-class RGB+NIR one: the shared classes' classifier rows move to their
    new ids by name, the RGB stem channels are kept and the new band starts from their mean."""
    images, masks = _four_chips(kampala, tmp_path)
    first = tmp_path / "rgb.safetensors"
    args = _train_args(images, masks, first, epochs=1)
    args[args.index("--arch") + 1] = "deeplabv2_tiny"
    assert main([*args, "--pretrained", "none"]) == 0
    four = _four_band_chips(images, tmp_path / "four")
    second = tmp_path / "rgbn.safetensors"
    args = _train_args(four, masks, second, epochs=1)
    args[args.index("--arch") + 1] = "deeplabv2_tiny"
    args[args.index("--classes") + 1] = "building,background,road"
    capsys.readouterr()
    code = main(
        [*args, "--pretrained", "none", "--band-names", "red,green,blue,nir", "--init-from", str(first)]
    )
    assert code == 0
    said = capsys.readouterr().err
    assert "classifier: 2 of 3 classes kept by name (building, background); started fresh: road" in said
    assert "stem: 3 of 4 bands kept by name; new (nir) start from the mean" in said
    adapted = load_checkpoint(second).metadata
    recorded = adapted.training["initialised_from"]["adapted"]
    assert len(recorded) == 2 and recorded[0].startswith("classifier:") and recorded[1].startswith("stem:")
    assert [b.name for b in adapted.bands] == ["red", "green", "blue", "nir"]
    source = load_checkpoint(first).metadata
    assert adapted.bands[0].mean == source.bands[0].mean  # a kept band keeps its weights' normalisation


def test_adapt_weights_moves_rows_and_channels_by_name(kampala: Path, tmp_path: Path) -> None:
    from models.adapt import adapt_weights

    images, masks = _four_chips(kampala, tmp_path)
    first = tmp_path / "rgb.safetensors"
    args = _train_args(images, masks, first, epochs=1)
    args[args.index("--arch") + 1] = "deeplabv2_tiny"
    assert main([*args, "--pretrained", "none"]) == 0
    source = load_checkpoint(first)
    target = build_model("deeplabv2_tiny", 3, 4, 16, "none")
    adapt_weights(
        target,
        source.model,
        source.metadata,
        ["building", "road", "background"],
        ["nir", "red", "green", "blue"],
        16,
    )
    theirs, ours = source.model.state_dict(), target.state_dict()
    stem = next(k for k, v in theirs.items() if v.ndim == 4 and v.shape[1] == 3)
    assert torch.equal(ours[stem][:, 1:], theirs[stem])  # red, green, blue moved by name
    assert torch.allclose(ours[stem][:, 0], theirs[stem].mean(dim=1))  # nir: their mean
    head = [k for k, v in theirs.items() if v.shape[:1] == (2,) and ours[k].shape[:1] == (3,)]
    assert head
    for key in head:
        assert torch.equal(ours[key][0], theirs[key][1]) and torch.equal(ours[key][2], theirs[key][0])
