"""What the tiny model families share: the training corpus and byte-level BPE of their tokenizers,
token look-ups, the chat-template lines for a message's items, and the atomic build of a model directory.

Imported by ``qwen`` and ``nemotron``; it imports neither.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CORPUS",
    "MARKER_FILE",
    "build_once",
    "content_items_template",
    "non_word_ids",
    "token_id",
    "train_bpe",
]

MARKER_FILE = ".tiny-model-complete"
"""Written last into a finished model directory; its presence skips a rebuild."""

_WORD_PIECE = re.compile(r"[ A-Za-z]{2,}")

CORPUS = """\
The video shows a red car driving down a busy city street at night. Bright lights
shine from the shop windows, and people walk along the wide sidewalk. A yellow taxi
stops at the corner while a blue bus waits at the traffic light.

A small brown dog runs across a green field in the morning sun. The camera follows
the dog as it jumps over the tall grass and chases a white ball. Two children laugh
and call the dog back to the wooden fence near the old house.

In this clip, a woman in a black jacket rides a bicycle past a row of parked cars.
The road is wet after the rain, and the sky is grey with heavy clouds. Trees with
orange and golden leaves line both sides of the quiet street.

A man stands on a bridge over a river and points at the boats below. The water is
dark blue and calm. Birds fly above the bridge, and a train crosses in the distance
while the camera slowly pans from left to right.

The scene shows a kitchen with a white table, a silver pot on the stove, and a cat
sleeping on a chair. Warm light comes through the window. Someone pours water into
a glass and places a plate of green and red vegetables on the table.

Cars, trucks and motorbikes move along the highway under a clear sky. The camera is
mounted on the dashboard of a grey car. Signs pass by, the lane markings are white,
and the sun sets behind the hills in shades of pink, purple and gold.
"""

_CONTENT_ITEMS = """\
{%- for item in message['content'] %}
{%- if item['type'] == 'image' or 'image' in item %}
{{- '@IMAGE@' }}
{%- elif item['type'] == 'video' or 'video' in item %}
{{- '@VIDEO@' }}
{%- elif item['type'] == 'text' %}
{{- item['text'] }}
{%- endif %}
{%- endfor %}
"""


def content_items_template(image: str, video: str) -> str:
    """Chat-template lines that render a message given as a list of items: its text, and each image
    and video as the model's placeholder (``image``, ``video``)."""
    return _CONTENT_ITEMS.replace("@IMAGE@", image).replace("@VIDEO@", video)


def train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a deterministic byte-level BPE (Qwen pre-tokenizer) on ``CORPUS``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return bpe.get_vocab(), [tuple(m.split(" ") if isinstance(m, str) else m) for m in merges]


def token_id(tokenizer: Any, token: str) -> int:
    """Look up the id of a token that must exist in ``tokenizer``."""
    found = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(found, int) or tokenizer.convert_ids_to_tokens(found) != token:
        raise KeyError(f"token {token!r} missing from tiny tokenizer")
    return found


def non_word_ids(tokenizer: Any) -> list[int]:
    """Ids of added tokens and of tokens that are not multi-letter word pieces."""
    added = set(tokenizer.get_added_vocab().values())
    return [
        i for i in range(len(tokenizer)) if i in added or not _WORD_PIECE.fullmatch(tokenizer.decode([i]))
    ]


def build_once(out_dir: str, write: Callable[[Path], None]) -> str:
    """Run ``write`` in a staging dir, then move it to ``out_dir`` unless already built.

    The marker is written last and the move is atomic, so ``out_dir`` is
    either absent, empty, or complete; a non-empty foreign directory is refused.
    """
    target = Path(out_dir)
    if (target / MARKER_FILE).exists():
        return str(target)
    if target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty and holds no tiny model")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)
    try:
        write(staging)
        (staging / MARKER_FILE).write_text("complete\n")
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / MARKER_FILE).exists():  # a concurrent build may have won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
