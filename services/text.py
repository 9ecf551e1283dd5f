"""Text stages: transform the prompt that the chain carries to the diffusion stages after it
(onnx-web's text-prompt). Its own family, since the stage type's prefix names the family.

In tilechain every stage has its own params, so there is no job-wide prompt to rewrite as in
onnx-web; instead the chain's images carry one: text-prompt (and edit-metadata) write `prompt`
into their provenance, and a later diffusion stage whose own prompt is empty uses it. The
prompt is worked out when the stage is planned (deterministically: a prompt model decodes
greedily), so the gateway knows it before anything runs."""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from tilechain.v1 import tiles_pb2

from .core.drawing import load_font, render_text
from .core.models import ModelEntry, hub_offline
from .core.params import Param, ParamError, dict_to_struct, struct_to_dict
from .core.stage import IMAGE, RGB8, OutputPlan, Stage, TileWork, module_installed, register

CARD_WIDTH = 512  # the prompt card, when the stage has no image to carry the prompt


@functools.lru_cache(maxsize=64)
def extend_prompt(entry: ModelEntry, prompt: str, min_length: int) -> str:
    """The prompt continued by a text-generation model (onnx-web: MagicPrompt) until it has
    min_length characters; greedy, so the same prompt always gives the same result (the gateway
    plans with it, the service runs with it)."""
    source = str(entry.path) if entry.path is not None else entry.hub
    hub_offline()
    try:
        generate = _text_pipeline(source)
    except Exception as exc:
        raise ParamError("model", f"{entry.name!r} ({entry.source}) does not load as a text-generation model: {type(exc).__name__}: {exc}") from None
    text = prompt
    for _ in range(5):  # onnx-web's retry limit
        if len(text) >= min_length:
            break
        tokens = max(8, (min_length - len(text)) // 2)
        result = generate(text, max_new_tokens=tokens, do_sample=False, num_return_sequences=1)
        # bytes that do not decode (a model's half-finished characters) and control characters go
        longer = "".join(c for c in str(result[0]["generated_text"]) if c.isprintable() and c != "\ufffd").strip()
        if len(longer) <= len(text):
            break
        text = longer
    return text


@functools.lru_cache(maxsize=2)
def _text_pipeline(source: str) -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers.pipeline("text-generation", model=source, device="cpu")


@register
class TextPrompt(Stage):
    type = "text-prompt"
    family = "text"
    doc = (
        "Transform the chain's prompt (onnx-web's text-prompt): extend it with a text-generation model from "
        "models.yaml (prompts), remove tokens by a pattern, add a suffix. The result travels with the images "
        "(their metadata's prompt) to later diffusion stages whose own prompt is empty; images pass through. "
        "With no image before it, the stage makes a card showing the prompt to carry it."
    )
    params = (
        Param("prompt", str, "", "The prompt to transform; '' takes the one the chain's images carry."),
        Param("model", str, "", "A text-generation model named in models.yaml (prompts) to extend the prompt with; '' for none."),
        Param("min_length", int, 75, "With a model: extend the prompt until it has this many characters.", min=1, max=2000),
        Param("remove_tokens", str, "", "A regular expression; every match is removed from the prompt (after extending)."),
        Param("add_suffix", str, "", "Appended to the prompt after a comma."),
    )

    def transformed(self, inputs: list[tiles_pb2.Canvas]) -> str:
        prompt = self.p["prompt"] or self.carried(inputs, "prompt")
        if self.p["model"]:
            if not module_installed("transformers"):
                raise ParamError("model", "extending a prompt with a model needs transformers, which this install lacks (the tilechain[models] extra)")
            if self.context.models is None:
                raise ParamError("model", "no model registry is configured")
            prompt = extend_prompt(self.context.models.resolve("prompts", self.p["model"]), prompt, self.p["min_length"])
        if self.p["remove_tokens"]:
            try:
                prompt = re.sub(self.p["remove_tokens"], "", prompt)
            except re.error as exc:
                raise ParamError("remove_tokens", f"{self.p['remove_tokens']!r} is not a regular expression: {exc}") from None
            prompt = " ".join(prompt.split())
        if self.p["add_suffix"]:
            prompt = f"{prompt}, {self.p['add_suffix']}" if prompt else self.p["add_suffix"]
        return prompt

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        self.prompt = self.transformed(inputs)
        images = self.chain_images(inputs)
        if images:
            return [OutputPlan(self.derived(image, image.width, image.height), {"image": image}) for image in images]
        self.card = self.render_card()
        canvas = tiles_pb2.Canvas(width=CARD_WIDTH, height=self.card.rect.height + 32, format=RGB8, role=IMAGE, index=0)
        canvas.provenance.CopyFrom(self.provenance())
        return [OutputPlan(canvas, {})]

    def provenance(self, source: tiles_pb2.Canvas | None = None) -> Any:
        data = struct_to_dict(super().provenance(source))
        data["prompt"] = self.prompt
        return dict_to_struct(data)

    def render_card(self) -> Any:
        """The prompt, wrapped to the card's width, white on black."""
        font = load_font("", 20)
        words, lines = self.prompt.split(), [""]
        for word in words:
            candidate = f"{lines[-1]} {word}".strip()
            if font.getlength(candidate) <= CARD_WIDTH - 32 or not lines[-1]:
                lines[-1] = candidate
            else:
                lines.append(word)
        return render_text("\n".join(lines) or " ", font, 16, 16, (255, 255, 255, 255))

    def process_tile(self, work: TileWork) -> np.ndarray:
        if not work.inputs:  # the card
            tile = np.zeros((work.window.height, work.window.width, 3), np.uint8)
            return self.card.over(tile, work.window)
        return work.pixels()
