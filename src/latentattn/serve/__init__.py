"""Serving: continuous batching over the model-wide paged cache (`engine`), per-request sampling
(`sampling`), prefix caching (`prefix_cache`), an OpenAI-compatible HTTP API (`api`) and a load
generator (`loadtest`)."""
