from setuptools import find_packages, setup

setup(
    name="gem-kernels",
    version="0.1.0",
    description="The GEM loss (Li et al., ICLR 2025) for LLM fine-tuning, as cheap as cross-entropy: "
    "streaming Triton kernels, a fused lm_head path and trainer integrations",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gem_kernels", "gem_kernels.*"]),
    python_requires=">=3.9",
    # torch is not pinned: CPU and CUDA builds are both fine (>= 2.6 for torch.library.triton_op).
    install_requires=["torch>=2.6"],
    extras_require={
        # triton comes with CUDA builds of torch; the interpreter (TRITON_INTERPRET=1) needs numpy.
        "triton": ["triton>=3.2", "numpy"],
        # deepspeed: the ZeRO-1/2/3 tests (tests/test_integrations_deepspeed.py). Its PyPI release is
        # an sdist that builds without torch (ops are compiled on first use), so installing it
        # never pulls a second torch into the build environment.
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "triton>=3.2",
            "numpy",
            "deepspeed>=0.19.8,<0.20",
            "ruff>=0.6",
        ],
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],
        # peft: apply_gem on PEFT models (LoRA head refused, modules_to_save head fused; tested)
        "hf": ["transformers", "trl", "accelerate", "peft"],
        # trl: its fused LM head (SFTTrainer's default loss) is a provider of the benchmark
        "bench": ["liger-kernel", "cut-cross-entropy", "trl", "matplotlib", "triton>=3.2", "numpy"],
    },
    license="Apache-2.0",
)
