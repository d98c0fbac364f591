"""Offline tools beside the trainer: data preparation and export to Hugging Face format."""
