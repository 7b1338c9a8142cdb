"""Checkpoint readers and writers (keras-hub presets, Hugging Face safetensors) and handle
resolution (built-in names, kaggle://, hf://, local directories)."""
