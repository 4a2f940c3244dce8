from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

from deeplab_common.errors import CheckpointError
from models.checkpoint import load_checkpoint, read_metadata, save_checkpoint, update_metadata
from models.metadata import BandInfo, CheckpointMetadata, CRFParams, default_classes
from models.registry import build_model
from pipeline.cli import main


def _metadata() -> CheckpointMetadata:
    return CheckpointMetadata(
        architecture="deeplabv3plus_efficientnet_lite0",
        arch_args={"num_classes": 3, "in_channels": 4, "output_stride": 16},
        classes=default_classes(["background", "building", "road"]),
        bands=[BandInfo(name=n, mean=100.0 + i, std=50.0) for i, n in enumerate(["r", "g", "b", "nir"])],
        pixel_size_m=0.3,
        crf=CRFParams(w1=5, sigma_alpha=80, sigma_beta=13),
        training={"seed": 7, "command": "deeplab train ..."},
        metrics={"val": {"miou": 0.5}},
    )


def test_round_trip_keeps_metadata_and_gives_identical_logits(tmp_path: Path) -> None:
    metadata = _metadata()
    model = build_model(metadata.architecture, **metadata.arch_args).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, metadata)
    loaded = load_checkpoint(path)
    for field in (
        "architecture",
        "arch_args",
        "classes",
        "bands",
        "pixel_size_m",
        "crf",
        "training",
        "metrics",
    ):
        assert getattr(loaded.metadata, field) == getattr(metadata, field), field
    assert loaded.metadata.software_version.startswith("deeplab-pipeline")
    x = torch.randn(2, 4, 96, 96)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded.model(x))
    assert len(loaded.sha256) == 64
    assert oct(path.stat().st_mode & 0o777) != oct(0o600), "published files must not be private temp files"


def test_half_precision_weights_are_close_and_half_the_size(tmp_path: Path) -> None:
    metadata = _metadata()
    model = build_model(metadata.architecture, **metadata.arch_args).eval()
    full = save_checkpoint(tmp_path / "full.safetensors", model, metadata)
    half = save_checkpoint(tmp_path / "half.safetensors", model, metadata, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert read_metadata(half).weights_dtype == "float16"
    x = torch.randn(1, 4, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(load_checkpoint(half).model(x), model(x), atol=5e-2, rtol=5e-2)


def test_pickle_file_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (open, (str(marker), "w"))

    path = tmp_path / "model.pt"
    torch.save({"state": Evil()}, path)
    with pytest.raises(CheckpointError, match="pickle") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content", [b"", b"hello world, not a model", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}..."]
)
def test_files_that_are_not_checkpoints_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_safetensors_without_our_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a deeplab-pipeline checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_update_metadata_keeps_weights(tmp_path: Path) -> None:
    metadata = _metadata()
    model = build_model(metadata.architecture, **metadata.arch_args).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, metadata)
    update_metadata(path, crf=CRFParams(w1=3, sigma_alpha=20, sigma_beta=3))
    loaded = load_checkpoint(path)
    assert loaded.metadata.crf.w1 == 3
    x = torch.randn(1, 4, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded.model(x))


def test_torchvision_state_dict_import_matches_torchvision(tmp_path: Path) -> None:
    """The COCO/VOC path: a torchvision DeepLab state dict, saved here as a user has it in the torch cache."""
    reference = deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True
    )
    reference.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so that the comparison means something
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state_path = tmp_path / "deeplabv3_mobilenet_v3_large_coco.pth"
    torch.save(reference.state_dict(), state_path)
    out = tmp_path / "imported.safetensors"
    classes = ",".join(f"c{i}" for i in range(21))
    assert (
        main(
            [
                "import-torchvision",
                str(state_path),
                "--arch",
                "deeplabv3_mobilenet_v3_large",
                "--classes",
                classes,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    loaded = load_checkpoint(out)
    x = torch.randn(1, 3, 128, 160)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), reference(x)["out"], atol=1e-4, rtol=1e-4)
    info = json.loads(json.dumps(loaded.metadata.model_dump(mode="json")))
    assert info["training"]["source"].startswith("torchvision")


def test_import_refuses_a_state_dict_with_objects(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": object()}, path)
    with pytest.raises(CheckpointError, match="not a plain tensor state dict"):
        from models.torchvision_import import read_state_dict

        read_state_dict(path)


def test_header_length_whose_low_byte_looks_like_pickle_still_loads(tmp_path: Path) -> None:
    """A safetensors header length such as 0x9980 starts with the byte 0x80, as a pickle does."""
    metadata = _metadata()
    model = build_model(metadata.architecture, **metadata.arch_args).eval()
    path = tmp_path / "m.safetensors"
    for pad in range(0, 600):
        save_checkpoint(path, model, metadata.model_copy(update={"training": {"pad": "x" * pad}}))
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert "pad" in load_checkpoint(path).metadata.training
