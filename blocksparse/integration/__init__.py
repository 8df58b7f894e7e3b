"""Glue to Hugging Face transformers / PEFT / datasets, the default model and corpus.

    model.py       load_model: the embedded default (GGUF -> cached fp32), directories, sparse checkpoints
    checkpoint.py  sparse checkpoints (safetensors + the blocksparse_config.json marker)
    data.py        named datasets and local files, calib / train / eval splits
    evaluate.py    perplexity (Wanda convention)
    peft.py        LoRA on BlockSparseLinear through the fused op
    train.py       LoRA training on the HF Trainer (DDP under torchrun), distillation
    cache.py       the cache folder, atomic writes

Submodules import their heavy dependencies themselves, so `import
blocksparse.integration` stays light.
"""
