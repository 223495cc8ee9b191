"""OpenTelemetry: spans in (OTLP) and out, mapped onto the v1 event contract (mapping.py)."""
