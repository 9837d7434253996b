"""state_dict names, order and shapes of the five published configs equal the reference key lists."""
import json

import pytest
import torch

from fractal_models import CONFIG_NAMES, build_model, config_kwargs
from fractal_models.checkpoint import identify_config
from tests.conftest import REFERENCE


def reference_keys(name):
    path = REFERENCE / "keys" / f"{name}.json"
    if not path.exists():
        pytest.fail(f"{path} missing (set FRACTAL_SHARED)")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_published_state_dict_matches(name):
    ref = reference_keys(name)
    with torch.device("meta"):
        model = build_model(name)
    ours = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]
    theirs = [(e["name"], e["shape"], e["dtype"]) for e in ref["state_dict"]]
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert ref["constructor"]["num_conds"] == config_kwargs(name)["num_conds"]
    assert ref["constructor"]["guiding_pixel"] == config_kwargs(name)["guiding_pixel"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_identify_config(name):
    with torch.device("meta"):
        state = build_model(name).state_dict()
    assert identify_config(state) == name


def test_unknown_config_names_the_argument():
    with pytest.raises(ValueError, match="config: unknown config 'fractalmar_xl'"):
        build_model("fractalmar_xl")
