"""The scoring service: `mvpp serve` (app: HTTP, service: the work, batching: merging
requests that arrive together)."""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_UPLOAD_MB = 200
