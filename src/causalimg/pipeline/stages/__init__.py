"""The pipeline's stages, one module each: what a stage reads of the config, and its body."""
