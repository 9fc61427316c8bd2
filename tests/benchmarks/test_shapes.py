"""The benchmark model shapes are what their names say: built on the meta device, parameters counted."""

import pytest

from benchmarks import shapes


def meta_params(folder: str) -> int:
    from transformllm_ray.train.model import build_meta_model, count_params

    return count_params(build_meta_model(folder))


@pytest.mark.parametrize("shape, low, high", [
    # Mistral-7B-v0.1 is 7.24B with a 32,000 vocabulary; SmolLM2's 49,152 adds 2 x 17,152 x 4,096 = 0.14B.
    ("mistral-7b", 7.3e9, 7.45e9),
    ("mistral-1b", 1.0e9, 1.2e9),
])
def test_shape_sizes(tmp_path, shape, low, high):
    folder = shapes.config_folder(str(tmp_path / shape), shape)
    assert low <= meta_params(folder) <= high


def test_weights_folder_loads_into_the_train_model(tmp_path, monkeypatch):
    """Random weights written by weights_folder load through the train stage's own loader (names match)."""
    import torch

    from transformllm_ray.train.model import build_meta_model, load_base_weights, materialize

    # A small copy of the 1B shape: same block, 2 layers, so the test stays light.
    monkeypatch.setitem(shapes.SHAPES, "tiny", {**shapes.SHAPES["mistral-1b"], "num_hidden_layers": 2,
                                                "hidden_size": 256, "intermediate_size": 896,
                                                "num_attention_heads": 4, "num_key_value_heads": 2})
    folder = shapes.weights_folder(str(tmp_path / "tiny"), "tiny", seed=3)
    model = build_meta_model(folder)
    materialize(model, torch.device("cpu"))
    load_base_weights(model, folder)
    w = model.model.layers[0].mlp.down_proj.weight
    assert 0.01 < float(w.detach().std()) < 0.03  # transformers' initializer_range 0.02, not zeros or leftovers


def test_unknown_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.config_folder(str(tmp_path / "x"), "mistral-3b")
