"""The training package loads its names lazily: every exported name still imports, the light
settings are the same objects wherever they are imported from, and none of them pulls in torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import secure_fl.training as training


def _torch_after(code: str) -> bool:
    script = f"{code}\nimport sys\nprint('torch' in sys.modules or 'monai' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip() == "True"


@pytest.mark.parametrize("name", training.__all__)
def test_every_exported_name_imports(name: str) -> None:
    assert getattr(training, name) is not None
    assert name in dir(training)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        training.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from secure_fl.training import no_such_name")


def test_the_light_settings_are_one_object_under_every_old_name() -> None:
    import secure_fl.data as data
    import secure_fl.data.preprocess_config as preprocess_config
    import secure_fl.data.transforms as transforms
    import secure_fl.training.strategies as strategies
    import secure_fl.training.strategy_names as strategy_names
    import secure_fl.training.train_config as train_config
    import secure_fl.training.trainer as trainer

    assert data.PreprocessConfig is transforms.PreprocessConfig
    assert transforms.PreprocessConfig is preprocess_config.PreprocessConfig
    assert strategies.STRATEGIES is strategy_names.STRATEGIES is training.STRATEGIES
    assert trainer.TrainConfig is train_config.TrainConfig is training.TrainConfig


@pytest.mark.parametrize(
    "code",
    [
        "import secure_fl.training",
        "from secure_fl.training import ExperimentConfig, TrainConfig, STRATEGIES, ModelConfig",
        "from secure_fl.data import PreprocessConfig",
        "import secure_fl.training.config",
        # Loading (and validating) a whole config, privacy checks included.
        "import pathlib, tempfile; from secure_fl.training.config import load_config; "
        "p = pathlib.Path(tempfile.mkdtemp()) / 'c.toml'; "
        'p.write_text(\'name = "x"\\n[privacy]\\nlevel = "site"\\ntarget_epsilon = 8.0\\n\'); '
        "load_config(p)",
    ],
)
def test_the_settings_import_no_torch(code: str) -> None:
    assert not _torch_after(code)


def test_the_heavy_names_still_bring_torch() -> None:
    # The check above can fail: touching the trainer does load torch and MONAI.
    assert _torch_after("from secure_fl.training import SiteTrainer")
