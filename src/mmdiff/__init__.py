"""mmdiff: multimodal model diffing with sparse autoencoders.

Find the SAE features that multimodal fine-tuning changed in a VLM's language backbone, detect the
ones that carry spatial reasoning, OCR and safety behaviour, explain them, attribute them to
attention heads, and remove or steer them against honest controls.
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that wait for work sleep instead of spinning, unless the user chose otherwise. On a
# CPU that other processes also use, spinning threads wait for descheduled peers at every parallel
# region: a loop of small torch ops ran 21x slower with torch's 2 default threads (98.5 s against
# 4.7 s passive, 2-core host at load 11). It takes effect only when mmdiff is imported before torch
# (the `mmdiff` command always is); docs/design.md has the measurement.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
