"""jlcm-gguf: JLCM (Jointly Learnable Codebooks and Mappings) quantization to GGUF for llama.cpp."""

__version__ = "0.1.0"
