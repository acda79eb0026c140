"""Config loading: overrides, validation errors that name the key and the valid choices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmptm.config import ConfigError, bundled_config_names, load_config, resolve_config_path


def test_bundled_configs_resolve_by_bare_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"clip_tiny.yaml", "clip_base.yaml"} <= set(bundled_config_names())
    assert resolve_config_path("clip_tiny.yaml").name == "clip_tiny.yaml"
    assert resolve_config_path("clip_tiny").name == "clip_tiny.yaml"


def test_bundled_configs_resolve_after_a_plain_install(tmp_path):
    """``pip install .`` (not editable) puts the recipes inside the package; bare names must find them there."""
    root = Path(__file__).resolve().parent.parent
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(root)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    assert (target / "mmptm" / "configs" / "clip_tiny.yaml").is_file()
    probe = (
        "import mmptm, mmptm.config as c; "
        "print(mmptm.__file__); print(c.resolve_config_path('clip_tiny.yaml').resolve())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "", "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"},
    ).stdout.split()
    assert out == [str(target / "mmptm" / "__init__.py"), str(target / "mmptm" / "configs" / "clip_tiny.yaml")]


def test_local_file_wins_over_bundled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip_tiny.yaml").write_text("train: {max_steps: 7}\n")
    assert resolve_config_path("clip_tiny.yaml") == Path("clip_tiny.yaml")


def test_bundled_configs_validate():
    for name in ("clip_tiny.yaml", "clip_base.yaml"):
        config = load_config(name)
        assert config.model["name"] == "clip"
        assert config.objectives[0]["name"] == "contrastive"


def test_overrides_apply_and_coerce():
    config = load_config(
        "clip_tiny.yaml",
        [
            "train.max_steps=3",
            "train.lr=2e-4",
            "data.train.batch_size=16",
            "objectives.0.weight=0.5",
            "objectives.0.ratio=1e-1",
            "model.vision.layers=1",
        ],
    )
    assert config.train.max_steps == 3
    assert config.train.lr == pytest.approx(2e-4)  # YAML reads 2e-4 as a string; the schema coerces it
    assert config.data["train"]["batch_size"] == 16
    assert config.objectives[0]["weight"] == 0.5
    assert config.objectives[0]["ratio"] == pytest.approx(0.1)  # a string in YAML, like train.lr
    assert config.model["vision"]["layers"] == 1


def test_an_override_into_a_section_set_to_null_creates_it(tmp_path):
    """``eval.zeroshot: null`` in a file, then ``eval.zeroshot.batch_size=8``: the section exists with
    its defaults and the override (it used to vanish without an error)."""
    tree = yaml.safe_load(resolve_config_path("clip_tiny.yaml").read_text())
    tree["eval"]["zeroshot"] = None
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    assert load_config(str(tmp_path / "c.yaml")).eval.zeroshot is None
    config = load_config(str(tmp_path / "c.yaml"), ["eval.zeroshot.batch_size=8"])
    assert config.eval.zeroshot is not None and config.eval.zeroshot.batch_size == 8


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_step=2", ["train.max_step", "did you mean 'max_steps'", "valid keys"]),
        ("model.vision.widht=3", ["model.vision.widht", "did you mean 'width'", "patch_size"]),
        ("data.train.batch_szie=3", ["data.train.batch_szie", "did you mean 'batch_size'"]),
        ("objectives.0.local_los=true", ["objectives.0.local_los", "did you mean 'local_loss'"]),
        ("model.name=clipp", ["model.name", "did you mean 'clip'", "registered models"]),
        ("objectives.0.name=contrastiv", ["did you mean 'contrastive'"]),
        ("train.precision=fp8", ["train.precision", "fp32", "bf16", "fp16"]),
        ("train.max_steps=many", ["train.max_steps", "'many'"]),
        ("model.vision.layers=two", ["model.vision.layers", "'two'"]),
        ("objectives.0.data=valid", ["objectives.0.data", "'valid'", "train"]),
        ("evall.zeroshot=null", ["evall", "did you mean 'eval'"]),
        ("train.min_lr=1e-2", ["'train.min_lr' (0.01) is above 'train.lr'", "must be <= lr"]),
    ],
)
def test_bad_keys_and_values_name_the_key_and_choices(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config("clip_tiny.yaml", [override])
    message = str(info.value)
    assert "clip_tiny.yaml" in message
    for fragment in expected:
        assert fragment in message, message


def test_bad_key_in_file_is_reported_with_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    tree = yaml.safe_load(resolve_config_path("clip_tiny.yaml").read_text())
    tree["train"]["warmup_stepz"] = 5
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"mine\.yaml.*train\.warmup_stepz.*did you mean 'warmup_steps'"):
        load_config(path)


def test_missing_config_file_lists_bundled_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"clip_tinny\.yaml.*did you mean 'clip_tiny\.yaml'"):
        load_config("clip_tinny.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="a.b=value"):
        load_config("clip_tiny.yaml", ["train.max_steps"])
    with pytest.raises(ConfigError, match="index"):
        load_config("clip_tiny.yaml", ["objectives.5.weight=1"])


def test_missing_import_module_is_named():
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        load_config("clip_tiny.yaml", imports=["no_such_module_xyz"])


def test_config_round_trips_through_yaml():
    config = load_config("clip_tiny.yaml", ["train.max_steps=5"])
    again = load_config(yaml.safe_load(config.to_yaml()))
    assert again.to_dict() == config.to_dict()


# Runs the CLI as ``mmptm`` does and reports, at exit, which heavy modules the process had loaded.
_CLI_WITH_MODULE_REPORT = """
import atexit, runpy, sys
def report():
    loaded = [m for m in ("accelerate", "mmptm.training.trainer") if m in sys.modules]
    print("LOADED=" + ",".join(loaded), file=sys.stderr)
atexit.register(report)
sys.argv = ["mmptm"] + sys.argv[1:]
runpy.run_module("mmptm.cli", run_name="__main__")
"""


def test_cli_misspelled_key_fails_fast_with_suggestion(tmp_path):
    """The config is rejected before any work starts: no trainer or accelerate import, no output
    folder, no demo data built (how long that takes is the machine's business, not a test's)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _CLI_WITH_MODULE_REPORT,
            "train",
            "clip_tiny.yaml",
            "train.max_step=2",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MMPTM_CACHE": str(cache)},
    )
    assert result.returncode == 2
    assert "unknown key 'train.max_step'" in result.stderr
    assert "did you mean 'max_steps'" in result.stderr
    assert "LOADED=\n" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists(), "no work may start before the config is valid"
    assert list(cache.iterdir()) == [], "no demo data may be built before the config is valid"
