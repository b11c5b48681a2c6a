"""Serving an export with per-session, decaying feedback state (TensorFlow only)."""
