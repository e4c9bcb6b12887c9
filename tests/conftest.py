import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# as `import mmdiff` does, before anything imports torch: OpenMP threads sleep rather than spin
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
