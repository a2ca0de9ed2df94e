"""Reading Hugging Face checkpoints: configs, safetensors, GGUF."""
