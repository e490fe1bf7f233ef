"""Data transforms used by our trainers (batchgeneratorsv2 API)."""
