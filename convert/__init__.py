"""PEFT LoRA -> GGUF conversion, merge and quantize (installed as `localgemma.convert`)."""
