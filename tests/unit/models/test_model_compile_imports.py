"""torch.compile on a micro model, and the models/losses packages stay free of ray and mlflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heygen_ray.models import create_model, model_inputs


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")  # raised inside inductor
def test_torch_compile_matches_eager():
    # One compile thread (TORCHINDUCTOR_COMPILE_THREADS=1, set by conftest before torch loads), through
    # inductor's own config.patch: a monkeypatch.setattr on the config module, undone at teardown,
    # left `compile_threads` unreadable for later compiles in the same process.
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    # one causal block keeps the inductor compile at a few seconds on 2 cores
    model = create_model("temporal_transformer_micro", num_layers=1, use_relative_position=False).eval()
    inputs = model.example_inputs(2)
    compiled = torch.compile(model)
    with torch.no_grad(), inductor_config.patch(compile_threads=1):
        eager = model(**inputs)
        out = compiled(**model_inputs(compiled, inputs))
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


def test_models_and_losses_import_neither_ray_nor_mlflow():
    code = (
        "import sys, heygen_ray.models, heygen_ray.losses\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "assert 'torch' in sys.modules\n"
        "print('BAD', bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 0, result.stderr
    assert "BAD []" in result.stdout, result.stdout
