"""mmdiff: multimodal model diffing with sparse autoencoders.

Find the SAE features that multimodal fine-tuning changed in a VLM's language backbone, detect the
ones that carry spatial reasoning, OCR and safety behaviour, explain them, attribute them to
attention heads, and remove or steer them against honest controls.
"""

__version__ = "0.1.0"
