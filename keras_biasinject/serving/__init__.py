"""Serving an export with per-session, decaying feedback state (TensorFlow only).

- `app.py`: `create_app` / `serve`, and `SessionServer`, which answers TF Serving's REST routes
  plus sessions and `:adapt`.
- `rest.py`: request bodies checked and turned into tensors; `Limits`, `AdaptPolicy`, `BadRequest`.
- `models.py`: `LoadedExport` (a loaded SavedModel version), `AdaptableModel` (the Keras model behind it).
- `store.py`: session stores (`SQLiteStore`, `PostgresStore` shared by replicas, `open_store`), with idle sessions expiring.
- `guard.py`: `RequestGuard`, before every route: cross-origin, rebound-Host and proxied requests
  refused (403), an `X-Request-Id` on every answer.
- `loop.py`: the serving loop (`"loop": "self"`): a session moved by the model's own feedback-head reading.
- `adapt.py`: `guarded_adapt`, the self-tuning steps kept only if the held-out loss holds.
"""
