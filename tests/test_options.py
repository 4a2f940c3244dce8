"""One options object: every SegmentOptions field is a flag of `segment` and `run-flow` and a parameter of
the flow, under one name; defaults live in the model alone; runtime-only fields are marked on the field."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from flows.cli import add_flow_commands, main
from pipeline.cli import build_parser
from pipeline.cli.flags import flag_of, options_from_args
from pipeline.engine.manifest import config_hash
from pipeline.engine.options import RUNTIME_ONLY_OPTIONS, SegmentOptions, is_runtime

ROOT = Path(__file__).resolve().parents[1]
FIELDS = set(SegmentOptions.model_fields)


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(add_flow_commands)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


@pytest.mark.parametrize("command", ["segment", "run-flow"])
def test_every_field_is_a_flag_of_its_own_name(command: str) -> None:
    actions = {a.dest: a for a in _subparser(command)._actions if a.help != argparse.SUPPRESS}
    assert set(actions) >= FIELDS, f"fields without a flag: {FIELDS - set(actions)}"
    for name in FIELDS:
        assert flag_of(name) in actions[name].option_strings, name
        assert actions[name].default is argparse.SUPPRESS, f"{name}: the model holds the default"
        assert actions[name].help, f"{name}: its help comes from the field"


def test_every_field_is_a_parameter_of_the_flow_and_of_its_deployments() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.segment_scenes import segment_scenes

    schema = parameter_schema(segment_scenes.fn).model_dump()
    options = schema["definitions"]["SegmentOptions"]["properties"]
    assert set(options) == FIELDS
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    for deployment in deployments:
        SegmentOptions.model_validate(deployment["parameters"]["options"])  # the deployments' are valid


def test_flags_give_the_options_and_defaults_come_from_the_model() -> None:
    parser = _subparser("segment")
    assert options_from_args(parser.parse_args(["s.tif", "--model", "m", "--out", "o"])) == SegmentOptions()
    argv = ["s.tif", "--model", "m", "--out", "o", "--tile", "256", "--no-crf", "--scales", "0.75", "1"]
    argv += ["--tta", "d4", "--keep-warm-s", "30", "--crf-params", '{"w1": 5, "sigma_alpha": 80}']
    argv += ["--probabilities", "--gpus-per-model-actor", "0.5", "--engine", "local"]
    options = options_from_args(parser.parse_args(argv))
    assert options.model_dump(exclude_unset=True, exclude={"crf_params"}) == {
        "tile": 256,
        "crf": False,
        "scales": (0.75, 1.0),
        "tta": "d4",
        "keep_warm_s": 30.0,
        "probabilities": True,
        "gpus_per_model_actor": 0.5,
        "engine": "local",
    }
    assert options.crf_params is not None
    assert (options.crf_params.w1, options.crf_params.sigma_alpha) == (5.0, 80.0)


def test_runtime_only_options_are_marked_on_their_fields() -> None:
    assert {
        "engine",
        "ray_address",
        "max_in_flight",
        "batch_size",
        "device",
        "gpus_per_model_actor",
        "keep_warm_s",
        "max_pixels",
        "wait",
        "crf_device",
        "runtime",
        "onnx_cache",
        "force_resolution",
        "verify_inputs",
        "scratch",
        "assets",
        "allow_remote_sources",
        "replace",
    } == RUNTIME_ONLY_OPTIONS
    assert not is_runtime("crf") and is_runtime("device")
    # the manifests written before the options moved keep their key: the nightly run redoes nothing (the
    # driver hashes options as planned: the CRF decided, its backend resolved)
    assert config_hash(SegmentOptions(crf=True)) == "0f9582525522fcf7"
    assert config_hash(SegmentOptions(crf=True, scales=(1.0,), fuse="max")) == "a31411298a38e503"
    # the polygon rules added with issue 22: unset, the keys are as before; set, they are part of them
    assert (
        config_hash(SegmentOptions(crf=True, min_area_m2=None, polygons_background=False))
        == "0f9582525522fcf7"
    )
    assert config_hash(SegmentOptions(crf=True, min_area_m2=0.0)) != "0f9582525522fcf7"
    # a field added later is hashed only away from what every earlier run did
    planned = SegmentOptions(crf=True, crf_backend="pydensecrf", scales=(1.0,), fuse="max")
    assert config_hash(planned) == "a31411298a38e503"
    assert config_hash(planned.model_copy(update={"crf_backend": "torch"})) != "a31411298a38e503"


def test_the_crf_backend_must_run_where_the_crf_is_asked_to() -> None:
    with pytest.raises(ValueError, match="--crf-device gpu needs --crf-backend torch"):
        SegmentOptions(crf_device="gpu", crf_backend="pydensecrf")
    assert SegmentOptions(crf_device="gpu").crf_backend is None  # resolved to torch by the plan


def test_a_bad_value_names_its_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scene, model = tmp_path / "s.tif", tmp_path / "m.safetensors"
    assert main(["segment", str(scene), "--model", str(model), "--out", str(tmp_path), "--tile", "8"]) == 2
    assert "--tile: Input should be greater than or equal to 16" in capsys.readouterr().err


def test_serve_validates_its_options_before_it_starts_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = json.dumps({"tiel": 256})
    assert main(["serve", "--work-dir", str(tmp_path), "--options", options]) == 2
    assert "tiel" in capsys.readouterr().err
    assert not (tmp_path / "prefect").exists(), "no server was started"
