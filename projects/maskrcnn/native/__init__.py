"""Native CPU kernels, built on first use (see onednn.py)."""
