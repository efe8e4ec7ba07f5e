from setuptools import find_packages, setup

setup(
    name="aquila",
    version="0.1.0",
    description="Pretrain, fine-tune and serve Aquila-style bilingual LLMs (FlagAI-compatible)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["aquila", "aquila.*"]),
    include_package_data=True,
    package_data={"aquila.serve": ["chat.html"]},
    install_requires=[
        "torch>=2.5",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "tiktoken>=0.7",  # the default byte-level BPE encoder (aquila/tokenizer/fast.py), ~3x tokenizers
        "sentencepiece>=0.1.99",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "ninja>=1.11",  # torch's C++ extension loader builds the int8/int4 decode kernels with it (cpu_kernels.py)
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",  # a test that hangs fails alone (with its stacks) instead of stalling CI
            "hypothesis>=6",
            "transformers>=4.40",
            "ruff>=0.5",
            "httpx>=0.24",
            "openai>=1.0",
            "selenium>=4.10",
            "lm-eval[api]>=0.4.13",  # tests/test_lm_eval.py: the field's evaluation tool against serve and HF exports
            "accelerate>=0.26",  # lm-eval's --model hf imports it (its [hf] extra would also pull peft)
            "gguf>=0.10",
            # compiles llama.cpp from source on first install (about 25 minutes on 2 cores; pip caches the wheel)
            "llama-cpp-python>=0.3",
        ],
        "serve": ["fastapi>=0.100", "uvicorn>=0.20", "prometheus-client>=0.17"],
        "logging": ["tensorboard>=2.10", "matplotlib>=3.5"],
        "gpu": ["flash-attn>=2.0"],
        "bmtrain": ["bmtrain>=0.2.3"],
        "bminf": ["bminf>=2.0"],
        "ray": ["ray>=2.9"],
        "gguf": ["gguf>=0.10"],
    },
    entry_points={"console_scripts": ["aquila=aquila.cli:main"]},
)
