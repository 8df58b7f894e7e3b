from setuptools import find_packages, setup

setup(
    name="blocksparse-llm",
    version="0.1.0",
    description="16x16 block-sparse Llama layers with fused LoRA in Triton: pruning, "
                "PEFT fine-tuning, evaluation and benchmarks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["blocksparse", "blocksparse.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors>=0.4", "tqdm"],
    extras_require={
        # Triton ships with CUDA builds of torch; CPU machines install it to run
        # the kernels under TRITON_INTERPRET=1 and to compile them ahead of time.
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=4.46", "peft>=0.13", "accelerate>=1.0", "datasets>=3.0",
               "gguf>=0.10", "gensim>=4.3", "sentencepiece"],
        "bench": ["matplotlib>=3.8"],
        "dev": ["pytest>=8", "hypothesis>=6.100"],
    },
    entry_points={"console_scripts": ["blocksparse=blocksparse.commands:main"]},
)
