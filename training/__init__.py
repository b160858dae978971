"""Training for idlm-serve: I-DLM conversion and gated LoRA (R-ISD) objectives, data, eval."""
