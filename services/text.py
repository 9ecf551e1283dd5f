"""Text stages: transform the prompt that the chain's images carry to the diffusion stages
after them (onnx-web's text-prompt)."""

from __future__ import annotations
