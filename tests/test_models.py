"""Adapters of every VLM family on tiny random-init checkpoints loaded by path (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmdiff.data.records import Record
from mmdiff.errors import DataError, ModelError
from mmdiff.models import ADAPTERS, TokenType, load_adapter
from mmdiff.models.tiny import BASE_SUBDIR, VLM_SUBDIR, build_tiny, load_tiny

FAMILIES = ["llava", "llava_next", "paligemma", "qwen2_vl", "qwen2_5_vl", "internvl"]
SIZES = [(20, 30), (40, 16), (16, 16)]  # (height, width) of the test images
QUESTIONS = ["Is it red?", "Is the green triangle above the yellow star?", "What?"]

# Image tokens per image, worked out by hand for the tiny configs (16-pixel tower, patch 4):
# llava / paligemma: (16 / 4)^2 = 16 whatever the image size.
# llava_next (pinpoints [h, w] in {[16,32], [32,16], [32,32]}): 16 base tokens, plus the anyres
#   grid unpadded to the image's aspect ratio, plus one image_newline per kept row:
#   20x30 -> best fit [32,32] (8x8 patches); height 20*8/30 = 5 -> pad (8-5)//2 = 1 -> rows 1..6:
#            6 rows x 8 + 6 newlines = 54 -> 70
#   40x16 -> [32,16] (8x4 patches); width 16*8/40 = 3 -> pad 0 -> 8 x 4 + 8 = 40 -> 56
#   16x16 -> [16,32] (tie on effective area, least waste; 4x8 patches); width 4 -> pad 2 -> cols 2..6:
#            4 x 4 + 4 = 20 -> 36
# qwen (patch 4, merge 2, sides rounded to multiples of 8): t*h*w / 4 with (t, h, w) in patches:
#   20x30 -> 16x32 -> (1, 4, 8) -> 8;  40x16 -> (1, 10, 4) -> 10;  16x16 -> (1, 4, 4) -> 4
# internvl (16-pixel tiles, patch 4, pixel shuffle 0.5: 2x2 = 4 tokens per tile; 1-4 tiles as
#   (cols, rows) of the aspect ratio nearest the image's, a tie going to more tiles while the image
#   covers over half their area; a thumbnail tile when there is more than one):
#   20x30 (w/h 1.5) -> 1x1, 2x1, 3x1, 2x2 all 0.5 off; 600 px > 512 -> 2x2 + thumbnail -> 20
#   40x16 (0.4) -> 1x3 (0.33) -> 3 + thumbnail -> 16;  16x16 -> 1x1 (2x2 ties, 256 < 512) -> 4
EXPECTED_IMAGE_TOKENS = {
    "llava": [16, 16, 16],
    "llava_next": [70, 56, 36],
    "paligemma": [16, 16, 16],
    "qwen2_vl": [8, 10, 4],
    "qwen2_5_vl": [8, 10, 4],
    "internvl": [20, 16, 4],
}


def make_records(n: int = 3) -> list[Record]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        records.append(
            Record(
                id=f"r{i}",
                question=QUESTIONS[i % len(QUESTIONS)],
                answers=["yes" if i % 2 == 0 else "no"],
                image=Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)),
                caption="A red circle left of a blue square." if i != 1 else "A star.",
                tasks=("spatial",),
                source="test",
            )
        )
    return records


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    roots = {}

    def get(family: str):
        if family not in roots:
            roots[family] = build_tiny(family, tmp_path_factory.mktemp(family))
        return roots[family]

    return get


@pytest.fixture(scope="module")
def adapter(tiny_root):
    cache = {}

    def get(family: str):
        if family not in cache:
            root = tiny_root(family)
            cache[family] = load_adapter(
                root / VLM_SUBDIR, base_lm=root / BASE_SUBDIR, dtype=torch.float32
            )
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_picked_from_model_type(adapter, family):
    a = adapter(family)
    expected = "qwen2_vl" if family.startswith("qwen") else family
    assert a.family == expected
    assert isinstance(a, ADAPTERS[expected])
    assert a.vlm.num_layers == 3 and a.vlm.d_model == 32
    assert (a.vlm.num_heads, a.vlm.head_dim) == (4, 8)
    assert a.vlm.o_proj(0).in_features == a.vlm.num_heads * a.vlm.head_dim
    assert a.vlm.unembedding_matrix().shape == (len(a.tokenizer), 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_mask_and_token_count(adapter, family):
    a = adapter(family)
    inputs = a.vlm_inputs(make_records())
    ids = inputs["input_ids"]
    types = a.token_types(inputs, "vlm")
    assert types.dtype == torch.int8 and types.shape == ids.shape
    assert torch.equal(types == TokenType.IMAGE, ids == a.image_token_id)
    assert torch.equal(a.image_token_mask(ids), ids == a.image_token_id)
    assert (ids == a.image_token_id).sum(1).tolist() == EXPECTED_IMAGE_TOKENS[family]
    # padding is SPECIAL and on the left: the last position is a real token in every row
    assert (types[inputs["attention_mask"] == 0] == TokenType.SPECIAL).all()
    assert inputs["attention_mask"][:, -1].all()
    assert (types == TokenType.TEXT).any(dim=1).all()


def test_llava_prompt_format(adapter):
    a = adapter("llava")
    assert a.vlm_prompt("Is it red?") == "USER: <image>\nIs it red? ASSISTANT:"
    assert a.base_prompt("A star.", "Is it red?") == "USER: A star.\nIs it red? ASSISTANT:"
    inputs = a.vlm_inputs(make_records(1))
    ids = inputs["input_ids"][0]
    text = a.tokenizer.decode(ids[ids != a.image_token_id])
    assert text == "<s>USER: \nIs it red? ASSISTANT:"
    types = a.token_types(inputs)[0]
    assert types[0] == TokenType.SPECIAL  # BOS


def test_llava_next_uses_chat_template_and_image_sizes(adapter):
    a = adapter("llava_next")
    assert a.vlm_prompt("Is it red?") == "USER: <image>\nIs it red? ASSISTANT:"
    inputs = a.vlm_inputs(make_records())
    assert inputs["image_sizes"].tolist() == [[20, 30], [40, 16], [16, 16]]


def test_paligemma_layout(adapter):
    a = adapter("paligemma")
    inputs = a.vlm_inputs(make_records(1))
    ids, types = inputs["input_ids"][0], a.token_types(inputs)[0]
    n = 16
    # image tokens first, then BOS, then "answer en {q}\n"
    assert (ids[:n] == a.image_token_id).all() and ids[n] == a.tokenizer.bos_token_id
    assert types[n] == TokenType.SPECIAL
    assert a.tokenizer.decode(ids[n + 1 :]) == "answer en Is it red?\n"
    assert (inputs["token_type_ids"] == 0).all()  # no suffix: everything is prefix
    base = a.base_inputs(make_records(1))
    assert (
        a.base_tokenizer.decode(base["input_ids"][0])
        == "<bos>A red circle left of a blue square.\nanswer en Is it red?\n"
    )


def test_qwen_inputs_carry_grid_and_mm_types(adapter):
    a = adapter("qwen2_vl")
    inputs = a.vlm_inputs(make_records())
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 8], [1, 10, 4], [1, 4, 4]]
    assert inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    assert torch.equal(
        inputs["mm_token_type_ids"], (inputs["input_ids"] == a.image_token_id).long()
    )
    text = a.tokenizer.decode(inputs["input_ids"][2][inputs["attention_mask"][2].bool()])
    assert text.endswith("<|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n")
    types = a.token_types(inputs)
    vision_markers = torch.isin(
        inputs["input_ids"],
        torch.tensor(a.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])),
    )
    assert (types[vision_markers] == TokenType.SPECIAL).all()


def test_internvl_layout(adapter):
    a = adapter("internvl")
    inputs = a.vlm_inputs(make_records())
    assert inputs["pixel_values"].shape == (5 + 4 + 1, 3, 16, 16)  # tiles of the three images
    ids = inputs["input_ids"][1]
    text = a.tokenizer.decode(ids[ids != a.image_token_id])
    assert text.endswith(
        "<|im_start|>user\n<img></img>\nIs the green triangle above the yellow star?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # <img> and </img> are special; the context tokens between them are the image, 4 per tile
    types = a.token_types(inputs)[1]
    image = (ids == a.image_token_id).nonzero().flatten()
    assert types[image[0] - 1] == TokenType.SPECIAL and types[image[-1] + 1] == TokenType.SPECIAL
    assert a.patch_grid(inputs, 1) == [(2, 2, False)] * 4
    with torch.no_grad():
        assert a.model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize("family", FAMILIES)
def test_base_inputs_pair_caption_and_question(adapter, family):
    a = adapter(family)
    records = make_records()
    inputs = a.base_inputs(records)
    types = a.token_types(inputs, "base")
    assert not (types == TokenType.IMAGE).any()
    assert (types[inputs["attention_mask"] == 0] == TokenType.SPECIAL).all()
    text = a.base_tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0].bool()])
    assert records[0].caption in text and records[0].question in text
    with torch.no_grad():
        logits = a.base.model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["vlm", "base"])
def test_with_answer_labels_cover_answer_and_eos(adapter, family, side):
    a = adapter(family)
    records = make_records()
    inputs = (
        a.vlm_inputs(records, with_answer=True)
        if side == "vlm"
        else a.base_inputs(records, with_answer=True)
    )
    tokenizer = a.tokenizer if side == "vlm" else a.base_tokenizer
    for row, record in enumerate(records):
        labelled = inputs["labels"][row][inputs["labels"][row] != -100]
        # the separator's space may belong to the answer token (" yes")
        assert tokenizer.decode(labelled).lstrip() == record.answers[0] + tokenizer.eos_token
        assert torch.equal(labelled, inputs["input_ids"][row, -len(labelled) :])
    with torch.no_grad():
        loss = a.backbone(side).model(**inputs).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["llava", "paligemma", "qwen2_vl"])
@pytest.mark.parametrize("side", ["vlm", "base"])
def test_yes_no_ids_decode_to_yes_and_no(adapter, family, side):
    a = adapter(family)
    yes, no = a.yes_no_token_ids(side)
    tokenizer = a.tokenizer if side == "vlm" else a.base_tokenizer
    assert yes and no and not set(yes) & set(no)
    assert {tokenizer.decode([i]).strip().lower() for i in yes} == {"yes"}
    assert {tokenizer.decode([i]).strip().lower() for i in no} == {"no"}
    assert (
        tokenizer.convert_tokens_to_ids("yes") in yes
    )  # the bare word is one token in the tiny vocab


def test_records_without_caption_or_answer_fail_clearly(adapter):
    a = adapter("llava")
    record = make_records(1)[0]
    record.caption = None
    with pytest.raises(DataError, match="caption"):
        a.base_inputs([record])
    record.answers = []
    with pytest.raises(DataError, match="no answers"):
        a.vlm_inputs([record], with_answer=True)
    with pytest.raises(DataError, match="no records"):
        a.vlm_inputs([])


def test_offline_uncached_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        load_adapter("mmdiff-test/no-such-vlm")
    with pytest.raises(ModelError, match="local_files_only"):
        load_adapter("mmdiff-test/no-such-vlm", local_files_only=True)


def test_missing_directory_and_unknown_family(tmp_path, tiny_root):
    with pytest.raises(ModelError, match="does not exist"):
        load_adapter(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="unknown family"):
        load_adapter(tiny_root("llava") / VLM_SUBDIR, family="blip")
    with pytest.raises(ModelError, match="not a paligemma checkpoint"):
        load_adapter(tiny_root("llava") / VLM_SUBDIR, family="paligemma")


def test_base_lm_of_another_model_is_rejected(tiny_root, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    other.save_pretrained(tmp_path / "other")
    root = tiny_root("llava")
    (tmp_path / "other").joinpath("tokenizer.json").write_bytes(
        (root / BASE_SUBDIR / "tokenizer.json").read_bytes()
    )
    (tmp_path / "other").joinpath("tokenizer_config.json").write_bytes(
        (root / BASE_SUBDIR / "tokenizer_config.json").read_bytes()
    )
    with pytest.raises(ModelError, match="does not match the VLM"):
        load_adapter(root / VLM_SUBDIR, base_lm=tmp_path / "other")


def test_without_base_lm_the_base_side_says_what_to_do(tiny_root):
    a = load_adapter(tiny_root("llava") / VLM_SUBDIR, dtype="float32")
    with pytest.raises(ModelError, match="base_lm="):
        a.backbone("base")
    with pytest.raises(ModelError, match="base_lm="):
        a.base_inputs(make_records(1))


def test_load_tiny_reuses_the_build(tmp_path):
    root = build_tiny("llava", tmp_path)
    stamp = (root / VLM_SUBDIR / "config.json").stat().st_mtime_ns
    a = load_tiny("llava", tmp_path)
    assert (root / VLM_SUBDIR / "config.json").stat().st_mtime_ns == stamp
    assert a.vlm.dtype == torch.float32
    with pytest.raises(ModelError, match="no tiny builder"):
        build_tiny("blip", tmp_path / "x")


def test_dtype_and_device_options(tiny_root):
    from mmdiff.models.loading import parse_dtype

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("auto") == "auto"
    with pytest.raises(ModelError, match="unknown dtype"):
        parse_dtype("int3")
    root = tiny_root("llava")
    with pytest.raises(ModelError, match="unknown device"):
        load_adapter(root / VLM_SUBDIR, device="gpu0")
    a = load_adapter(root / VLM_SUBDIR, base_lm=root / BASE_SUBDIR, dtype="bfloat16")
    assert a.vlm.dtype == torch.bfloat16 and a.base.dtype == torch.bfloat16
    assert a.vlm.device == torch.device("cpu")
    inputs = a.vlm_inputs(make_records(1))
    assert inputs["pixel_values"].dtype == torch.bfloat16  # float inputs follow the model
    assert inputs["input_ids"].dtype == torch.long
    with torch.no_grad():
        assert torch.isfinite(a.vlm.model(**inputs).logits).all()


def test_qwen_chat_template_from_processor_file(tiny_root, tmp_path):
    """Real Qwen2-VL repos keep the template in the processor's chat_template.json."""
    import json
    import shutil

    vlm = tmp_path / "qwen"
    shutil.copytree(tiny_root("qwen2_vl") / VLM_SUBDIR, vlm)
    template = (vlm / "chat_template.jinja").read_text()
    (vlm / "chat_template.jinja").unlink()
    (vlm / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    a = load_adapter(vlm, dtype="float32")
    assert a.tokenizer.chat_template is None
    assert a.vlm_prompt("What?").endswith(
        "<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n"
    )
    (vlm / "chat_template.json").unlink()
    with pytest.raises(ModelError, match="no chat template"):
        load_adapter(vlm, dtype="float32")


def test_loads_without_accelerate(tiny_root, monkeypatch):
    """device_map needs accelerate, which is not a core dependency: load, then move."""
    from mmdiff.models import loading

    monkeypatch.setattr(loading, "accelerate_available", lambda: False)
    a = load_adapter(tiny_root("llava") / VLM_SUBDIR, device="cpu", dtype="float32")
    assert a.vlm.device == torch.device("cpu") and a.vlm.dtype == torch.float32
