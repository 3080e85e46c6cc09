"""Serving an export over HTTP: an OpenAI-compatible API on one Engine, and replicas on Ray Serve
(installed as kvexport.serving; needs the `serve` extra)."""
