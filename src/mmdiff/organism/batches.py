"""Records -> padded training tensors, in exactly the prompt formats the processor produces."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from mmdiff.data.records import Record
from mmdiff.organism.architecture import IMAGE_MEAN, IMAGE_STD
from mmdiff.organism.mixtures import FOLLOW_UPS, LOOKUP, POSITION_LOOKUP
from mmdiff.organism.recipe import BASE_LOSSES
from mmdiff.organism.tokenizer import (
    IMAGE,
    base_prompt,
    follow_up_prompt,
    lookup_prompt,
    vlm_prompt,
)

IGNORE = -100


def pixel_values(records: Sequence[Record]) -> torch.Tensor:
    """[batch, 3, H, W] float32, CLIP-normalised as CLIPImageProcessor does for a 64x64 input."""
    arr = np.stack([np.asarray(r.load_image(), dtype=np.float32) for r in records]) / 255.0  # [B,H,W,3]
    arr = (arr - np.asarray(IMAGE_MEAN, dtype=np.float32)) / np.asarray(IMAGE_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _pad_left(seqs: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, width - len(s):] = torch.tensor(s)
        lab[i, width - len(s):] = torch.tensor(l)
        mask[i, width - len(s):] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def _answer_ids(tok: PreTrainedTokenizerFast, answer: str) -> list[int]:
    return tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]


def vlm_batch(tok: PreTrainedTokenizerFast, records: Sequence[Record], n_image_tokens: int) -> dict[str, torch.Tensor]:
    """VLM inputs "USER: <image>x64\\n{question} ASSISTANT:" + answer + EOS; loss on the answers only.

    A conversation (meta[mixtures.FOLLOW_UPS]) goes on, LLaVA's v1 template, with
    "USER: {question} ASSISTANT:" + answer + EOS for each later turn.
    """
    seqs, labels = [], []
    for r in records:
        prompt = tok(vlm_prompt(r.question).replace(IMAGE, IMAGE * n_image_tokens)).input_ids
        answer = _answer_ids(tok, r.answers[0])
        seq, lab = prompt + answer, [IGNORE] * len(prompt) + answer
        for question, later_answer in r.meta.get(FOLLOW_UPS, ()):
            prompt = tok(follow_up_prompt(question), add_special_tokens=False).input_ids
            answer = _answer_ids(tok, later_answer)
            seq, lab = seq + prompt + answer, lab + [IGNORE] * len(prompt) + answer
        seqs.append(seq)
        labels.append(lab)
    out = _pad_left(seqs, labels, tok.pad_token_id)
    out["pixel_values"] = pixel_values(records)
    return out


def base_batch(tok: PreTrainedTokenizerFast, records: Sequence[Record], *, loss_on: str = "sequence") -> dict[str, torch.Tensor]:
    """Base-LM inputs "USER: {caption}\\n{question} ASSISTANT:" + answer + EOS.

    `loss_on` picks the trained tokens: "answer" (answer + EOS only), "caption" (the caption too),
    or "sequence" (every token after BOS: caption, question and answer, as in pretraining).
    "sequence" is what the organism uses: the questions name objects copied from the caption
    ("is the red cross left of ..."), and predicting them is what trains the copying (induction)
    heads that binding an attribute to its object needs; with the answer-only loss the 4-layer LM
    never bound colours to shapes (docs/design.md). Records without a caption are bare text
    requests "USER: {question} ASSISTANT:"; look-up completions (mixtures.lookup_record) are
    "USER: {caption}\n{cue}", the cue word last.
    """
    if loss_on not in BASE_LOSSES:
        raise ValueError(f"loss_on {loss_on!r}: expected one of {BASE_LOSSES}")
    seqs, labels = [], []
    for r in records:
        lookup = r.meta.get("family") in (LOOKUP, POSITION_LOOKUP)
        prompt = tok(lookup_prompt(r.caption, r.question) if lookup else base_prompt(r.caption, r.question)).input_ids
        answer = _answer_ids(tok, r.answers[0])
        if loss_on == "sequence":
            lab = [IGNORE] + prompt[1:]
        else:
            lab = [IGNORE] * len(prompt)
            if loss_on == "caption" and r.caption:
                head = len(tok("USER:").input_ids)  # <s> user :
                n_cap = len(tok(r.caption, add_special_tokens=False).input_ids)
                lab[head:head + n_cap] = prompt[head:head + n_cap]
        seqs.append(prompt + answer)
        labels.append(lab + answer)
    return _pad_left(seqs, labels, tok.pad_token_id)
