"""Every supported family at its real size, built on the meta device from its published config.json.

No weights are read or allocated: the tests check what the adapters compute on the real
architectures (decoder layers, hook names, heads at each o_proj) and the image-token count per image
against each family's own processor. Where a processor needs a real tokenizer (which cannot ship
here), a stand-in tokenizer carries the family's image token, or the count comes from the image
processor alone, as each test says.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import transformers
from PIL import Image

from mmdiff.interp.heatmap import tile_token_count
from mmdiff.models import adapter_for_model_type
from mmdiff.models.internvl import tokens_per_tile
from mmdiff.models.loading import read_config
from mmdiff.models.published import (
    GEMMA2_2B,
    INTERNVL3_5_2B,
    INTERNVL_PREPROCESSOR,
    LLAMA31_8B,
    LLAVA15_7B,
    LLAVA_MORE_8B,
    LLAVA_NEXT_MISTRAL_7B,
    LLAVA_NEXT_PINPOINTS,
    MISTRAL_7B,
    QWEN2_7B,
    QWEN2_VL_7B,
    QWEN2_VL_PREPROCESSOR,
    QWEN3_1_7B,
    VICUNA_7B,
    paligemma2_3b,
)
from mmdiff.plan import image_tokens
from mmdiff.sae.formats.common import layer_from_name

pytestmark = pytest.mark.slow  # building 8B-parameter module trees takes seconds, even on meta

# name: (VLM config.json, base LM config.json, family, (layers, heads, head_dim, d_model))
MODELS = {
    "llava-1.5-7b": (LLAVA15_7B, VICUNA_7B, "llava", (32, 32, 128, 4096)),
    "llava-more-8b": (LLAVA_MORE_8B, LLAMA31_8B, "llava", (32, 32, 128, 4096)),
    "llava-next-mistral-7b": (LLAVA_NEXT_MISTRAL_7B, MISTRAL_7B, "llava_next", (32, 32, 128, 4096)),
    "paligemma2-3b-224": (paligemma2_3b(224), GEMMA2_2B, "paligemma", (26, 8, 256, 2304)),
    "paligemma2-3b-448": (paligemma2_3b(448), GEMMA2_2B, "paligemma", (26, 8, 256, 2304)),
    "paligemma2-3b-896": (paligemma2_3b(896), GEMMA2_2B, "paligemma", (26, 8, 256, 2304)),
    "qwen2-vl-7b": (QWEN2_VL_7B, QWEN2_7B, "qwen2_vl", (28, 28, 128, 3584)),
    "internvl3.5-2b": (INTERNVL3_5_2B, QWEN3_1_7B, "internvl", (28, 16, 128, 2048)),
}


@pytest.fixture(scope="module")
def meta_adapter(tmp_path_factory):
    """The adapter of a real-size VLM and its base LM, both on the meta device."""
    cache = {}

    def get(name: str):
        if name not in cache:
            vlm_config, base_config, _, _ = MODELS[name]
            root = tmp_path_factory.mktemp(name)
            for sub, config in (("vlm", vlm_config), ("base", base_config)):
                (root / sub).mkdir()
                (root / sub / "config.json").write_text(json.dumps(config))
            config = read_config(root / "vlm", local_files_only=True, trust_remote_code=False)
            cls = adapter_for_model_type(config.model_type)
            vlm_class = getattr(transformers, cls.vlm_classes[config.model_type])
            base = read_config(root / "base", local_files_only=True, trust_remote_code=False)
            with torch.device("meta"):
                vlm = vlm_class(config)
                base_lm = transformers.AutoModelForCausalLM.from_config(base)
            cache[name] = cls(vlm, SimpleNamespace(tokenizer=None), base_lm, None, name=name)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_layers_hooks_and_heads_at_real_size(meta_adapter, name):
    _, _, family, (n_layers, heads, head_dim, d_model) = MODELS[name]
    a = meta_adapter(name)
    assert a.family == family
    for side in ("vlm", "base"):
        backbone = a.backbone(side)
        assert backbone.num_layers == n_layers and backbone.d_model == d_model
        assert (backbone.num_heads, backbone.head_dim) == (heads, head_dim)
        names = {id(m): n for n, m in backbone.model.named_modules()}
        prefix = "model.language_model.layers" if side == "vlm" else "model.layers"
        for layer in range(n_layers):
            # hook point L is the output of the L-th decoder layer of the language model, never of
            # the vision tower (which has `layers` too)
            assert names[id(backbone.layers[layer])] == f"{prefix}.{layer}"
            assert layer_from_name(names[id(backbone.layers[layer])]) == layer
            o_proj = backbone.o_proj(layer)
            assert names[id(o_proj)] == f"{prefix}.{layer}.self_attn.o_proj"
            # per-head outputs are the o_proj input, heads x head_dim wide
            assert (o_proj.in_features, o_proj.out_features) == (heads * head_dim, d_model)
        assert backbone.check_layers([0, n_layers - 1]) == [0, n_layers - 1]
    assert a.vlm.unembedding_matrix().shape[1] == d_model


def _image(height: int, width: int) -> Image.Image:
    return Image.new("RGB", (width, height), (120, 60, 30))


def _stand_in_tokenizer():
    """A tiny tokenizer with LLaVA's "<image>" token: the processors expand it by their own count."""
    from mmdiff.models.tiny import _LLAVA_TOKENS, _train_tokenizer

    return _train_tokenizer(_LLAVA_TOKENS)


def _plan_tokens(a, size: tuple[int, int], preprocessor: dict | None = None) -> int:
    """What `mmdiff plan` counts for one image of this size."""
    facts = SimpleNamespace(adapter=a, vlm_config=a.model.config, preprocessor=preprocessor or {})
    return image_tokens(facts, *size)[0]


def _vision_tokens(a, pixel_values: torch.Tensor) -> int:
    """Image features per image (or per tile) the real-size tower and projector produce, on meta."""
    with torch.no_grad():
        features = a.model.get_image_features(pixel_values=pixel_values.to("meta"))
    features = getattr(features, "pooler_output", features)
    if isinstance(features, (list, tuple)):
        features = features[0]
    return int(features.shape[-2])


@pytest.mark.parametrize("name", ["llava-1.5-7b", "llava-more-8b"])
def test_llava_336px_has_576_image_tokens(meta_adapter, name):
    a = meta_adapter(name)
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    tokenizer = _stand_in_tokenizer()
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    out = processor(images=[_image(480, 640)], text=["<image>"], return_tensors="pt")
    n_processor = int((out["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum())
    assert n_processor == 576
    assert tile_token_count(a.patch_grid({}, 0)) == 576 == _plan_tokens(a, (480, 640))
    assert _vision_tokens(a, out["pixel_values"]) == 576


# (height, width) -> image tokens, worked out by hand for the pinpoints above: 576 base tokens, then
# the best-fitting pinpoint's grid of 24-patch tiles unpadded to the image's aspect ratio (the
# padding, (rows - int(scaled height)) // 2, comes off both sides), plus one image_newline per row:
#   480x640 -> [672, 672]: 48x48 patches; 480 * 48/640 = 36 -> pad 6 -> 36 rows -> 36 * 49 -> 2340
#   300x1000 -> [336, 1008]: 24x72 patches; 300 * 72/1000 = 21.6 -> pad 1 -> 22 rows -> 22 * 73 -> 2182
LLAVA_NEXT_TOKENS = {(480, 640): 2340, (300, 1000): 2182}


@pytest.mark.parametrize("size", list(LLAVA_NEXT_TOKENS))
def test_llava_next_anyres_count_matches_the_processor(meta_adapter, size):
    a = meta_adapter("llava-next-mistral-7b")
    image_processor = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    tokenizer = _stand_in_tokenizer()
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    out = processor(images=[_image(*size)], text=["<image>"], return_tensors="pt")
    n_processor = int((out["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum())
    assert n_processor == LLAVA_NEXT_TOKENS[size]
    assert tile_token_count(a.patch_grid({"image_sizes": out["image_sizes"]}, 0)) == n_processor
    assert _plan_tokens(a, size) == n_processor


@pytest.mark.parametrize("size, tokens", [(224, 256), (448, 1024), (896, 4096)])
def test_paligemma2_image_tokens_per_resolution(meta_adapter, size, tokens):
    a = meta_adapter(f"paligemma2-3b-{size}")
    assert tile_token_count(a.patch_grid({}, 0)) == tokens == _plan_tokens(a, (480, 640))
    assert a.model.config.text_config.num_image_tokens == tokens
    assert _vision_tokens(a, torch.zeros(1, 3, size, size)) == tokens


# Qwen2-VL's image processor resizes each side to a multiple of 28 (patch 14 x merge 2) and the
# image takes t * h * w / merge^2 tokens, (t, h, w) in patches:
#   480x640 -> 476x644 -> (1, 34, 46) -> 391;  300x1000 -> 308x1008 -> (1, 22, 72) -> 396
QWEN2_VL_TOKENS = {(480, 640): ((1, 34, 46), 391), (300, 1000): ((1, 22, 72), 396)}


@pytest.mark.parametrize("size", list(QWEN2_VL_TOKENS))
def test_qwen2_vl_tokens_from_image_grid_thw(meta_adapter, size):
    """From the image processor alone (the real tokenizer cannot ship): the adapter expands the
    placeholder to grid_thw.prod() / merge^2 tokens, the count `Qwen2VLProcessor` uses."""
    a = meta_adapter("qwen2-vl-7b")
    image_processor = transformers.Qwen2VLImageProcessorPil(**QWEN2_VL_PREPROCESSOR)
    vision = image_processor(images=[_image(*size)], return_tensors="pt")
    grid, tokens = QWEN2_VL_TOKENS[size]
    assert vision["image_grid_thw"].tolist() == [list(grid)]
    assert int(vision["image_grid_thw"].prod()) // image_processor.merge_size**2 == tokens
    ids = torch.full((1, tokens), a.image_token_id)
    tiles = a.patch_grid({"input_ids": ids, "image_grid_thw": vision["image_grid_thw"]}, 0)
    assert tiles == [(grid[1] // 2, grid[2] // 2, False)]  # not square
    assert tile_token_count(tiles) == tokens == _plan_tokens(a, size, QWEN2_VL_PREPROCESSOR)


# InternVL's dynamic tiling (max 12 tiles of 448 px, a thumbnail when more than one):
#   480x640 (w/h 4/3) -> 4 x 3 tiles exactly + thumbnail = 13 -> 13 * 256 = 3328
#   300x1000 (10/3) -> 3 x 1 (ratio 3; 6 x 2 ties but the image covers < half of 12 tiles) + thumbnail
#              = 4 -> 1024
INTERNVL_TILES = {(480, 640): 13, (300, 1000): 4}


@pytest.mark.parametrize("size", list(INTERNVL_TILES))
def test_internvl_tiling_matches_the_image_processor(meta_adapter, size):
    """From the image processor alone (InternVLProcessor needs torchvision for its video part):
    tiles x 256, the count InternVLProcessor writes."""
    a = meta_adapter("internvl3.5-2b")
    assert tokens_per_tile(a.model.config) == 256 == a.model.config.image_seq_length
    image_processor = transformers.GotOcr2ImageProcessorPil(**INTERNVL_PREPROCESSOR)
    vision = image_processor(images=[_image(*size)], crop_to_patches=True, return_tensors="pt")
    n_tiles = int(vision["num_patches"][0])
    assert n_tiles == INTERNVL_TILES[size]
    assert image_processor.get_number_of_image_patches(*size, {"crop_to_patches": True}) == n_tiles
    assert _vision_tokens(a, vision["pixel_values"][:1]) == 256
    ids = torch.full((1, n_tiles * 256), a.image_token_id)
    assert tile_token_count(a.patch_grid({"input_ids": ids}, 0)) == n_tiles * 256
    assert _plan_tokens(a, size, INTERNVL_PREPROCESSOR) == n_tiles * 256
