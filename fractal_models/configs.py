"""The five published configurations (``models/fractalgen.py`` of the reference) and a registry.

Each builder takes the reference's keyword arguments; the defaults of ``num_conds``/``guiding_pixel``
are the ones the published checkpoints were trained with (``shared/reference/keys``), and ``r_weight``
defaults to the training script's 5.0.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from fractal_models.fractalgen import FractalGen

_SPECS: Dict[str, Dict[str, Any]] = {
    "fractalar_in64": dict(img_size_list=(64, 4, 1), embed_dim_list=(1024, 512, 128), num_blocks_list=(32, 8, 3),
                           num_heads_list=(16, 8, 4), generator_type_list=("ar", "ar", "ar"),
                           num_conds=1, guiding_pixel=False),
    "fractalmar_in64": dict(img_size_list=(64, 4, 1), embed_dim_list=(1024, 512, 128), num_blocks_list=(32, 8, 3),
                            num_heads_list=(16, 8, 4), generator_type_list=("mar", "mar", "ar"),
                            num_conds=5, guiding_pixel=False),
    "fractalmar_base_in256": dict(img_size_list=(256, 16, 4, 1), embed_dim_list=(768, 384, 192, 64),
                                  num_blocks_list=(24, 6, 3, 1), num_heads_list=(12, 6, 3, 4),
                                  generator_type_list=("mar", "mar", "mar", "ar"), num_conds=5, guiding_pixel=True),
    "fractalmar_large_in256": dict(img_size_list=(256, 16, 4, 1), embed_dim_list=(1024, 512, 256, 64),
                                   num_blocks_list=(32, 8, 4, 1), num_heads_list=(16, 8, 4, 4),
                                   generator_type_list=("mar", "mar", "mar", "ar"), num_conds=5, guiding_pixel=True),
    "fractalmar_huge_in256": dict(img_size_list=(256, 16, 4, 1), embed_dim_list=(1280, 640, 320, 64),
                                  num_blocks_list=(40, 10, 5, 1), num_heads_list=(16, 8, 4, 4),
                                  generator_type_list=("mar", "mar", "mar", "ar"), num_conds=5, guiding_pixel=True),
}

CONFIG_NAMES = tuple(_SPECS)
"""The five published configs, by name: fractalar_in64, fractalmar_in64, fractalmar_{base,large,huge}_in256."""

# Small configs of the reference fixtures (shared/reference/fixtures): for tests, demos and CPU benchmarks.
_TINY: Dict[str, Dict[str, Any]] = {
    "tiny_mar": dict(img_size_list=(16, 4, 1), embed_dim_list=(64, 32, 16), num_blocks_list=(2, 2, 1),
                     num_heads_list=(4, 2, 2), generator_type_list=("mar", "mar", "ar"), num_conds=5,
                     guiding_pixel=False, class_num=10),
    "tiny_ar": dict(img_size_list=(16, 4, 1), embed_dim_list=(64, 32, 16), num_blocks_list=(2, 2, 1),
                    num_heads_list=(4, 2, 2), generator_type_list=("ar", "ar", "ar"), num_conds=1,
                    guiding_pixel=False, class_num=10),
    "tiny_mar_gp": dict(img_size_list=(16, 4, 2, 1), embed_dim_list=(64, 32, 16, 16), num_blocks_list=(2, 1, 1, 1),
                        num_heads_list=(4, 2, 2, 2), generator_type_list=("mar", "mar", "mar", "ar"), num_conds=5,
                        guiding_pixel=True, class_num=10),
}
TINY_CONFIG_NAMES = tuple(_TINY)
"""The small configs of the reference fixtures (tiny_mar, tiny_ar, tiny_mar_gp): for tests, demos and CPU runs."""


def config_kwargs(name: str, **overrides: Any) -> Dict[str, Any]:
    """Constructor arguments of a published config, with ``overrides`` applied."""
    specs = {**_SPECS, **_TINY}
    if name not in specs:
        raise ValueError(f"config: unknown config {name!r}; expected one of {', '.join(specs)}")
    kwargs = dict(specs[name])
    kwargs.setdefault("r_weight", 5.0)
    kwargs.update(overrides)
    return kwargs


def build_model(name: str, **overrides: Any) -> FractalGen:
    """Build a published config by name (e.g. under ``torch.device('meta')`` to inspect a big one cheaply)."""
    return FractalGen(**config_kwargs(name, **overrides))


def _builder(name: str) -> Callable[..., FractalGen]:
    def build(**kwargs: Any) -> FractalGen:
        return build_model(name, **kwargs)
    build.__name__ = name
    build.__doc__ = f"The published ``{name}`` configuration (reference keyword arguments accepted)."
    return build


fractalar_in64 = _builder("fractalar_in64")
fractalmar_in64 = _builder("fractalmar_in64")
fractalmar_base_in256 = _builder("fractalmar_base_in256")
fractalmar_large_in256 = _builder("fractalmar_large_in256")
fractalmar_huge_in256 = _builder("fractalmar_huge_in256")
